"""With the tokenizer: settle the chat template, and count (or drop) rows longer than train.seq_len, measured the
way TRL's SFTTrainer tokenizes them, so that nothing is cut or left out silently."""

from __future__ import annotations

from qlora_trainer.config.recipe import DataSection
from qlora_trainer.dataset.chat_templates import apply_chat_template
from qlora_trainer.dataset.data import Data, count_note
from qlora_trainer.dataset.formats import get
from qlora_trainer.errors import UserError


def fit_to_tokenizer(data: Data, section: DataSection, tokenizer, seq_len: int, model_name: str) -> Data:
    """Settle the chat template, then count (and with overlong: drop, leave out) rows longer than seq_len.

    TRL truncates to max_length and then silently drops rows left with no loss tokens; measuring the same token
    counts here first turns both into numbers in the run output.
    """
    template = None
    if data.conversational:
        assistant_only = get(data.format).assistant_turns and not section.train_on_prompt
        name, template = apply_chat_template(tokenizer, section.chat_template, assistant_only, model_name)
        data.notes.append(f"chat template: {name}")
    else:
        data.notes.append(f"template: {get(data.format).plain_template()}")
    data.stats["template"] = data.notes[-1].split(": ", 1)[1]
    data.train = _fit_split(data.train, "train", data, section, tokenizer, seq_len, template)
    if data.eval is not None:
        data.eval = _fit_split(data.eval, "eval", data, section, tokenizer, seq_len, template)
    data.stats.update(train_rows=len(data.train), eval_rows=len(data.eval) if data.eval is not None else 0)
    data.notes[0] = count_note(data)
    return data


def _fit_split(rows, split: str, data: Data, section: DataSection, tokenizer, seq_len: int, template):
    lengths = [token_lengths(row, tokenizer, template, section.train_on_prompt) for row in rows]
    overlong = [i for i, (total, _) in enumerate(lengths) if total > seq_len]
    # With truncation, a row whose loss tokens all lie past seq_len would train nothing; TRL drops those silently.
    no_loss = {i for i in overlong if lengths[i][1] >= seq_len}
    dropped = set(overlong) if section.overlong == "drop" else no_loss
    data.stats.update({f"{split}_overlong_rows": len(overlong), f"{split}_truncated_rows": len(overlong) - len(dropped),
                       f"{split}_dropped_rows": len(dropped), f"{split}_longest_tokens": max(t for t, _ in lengths),
                       f"{split}_mean_tokens": round(sum(min(t, seq_len) for t, _ in lengths) / len(lengths), 1)})
    if overlong:
        longest = max(lengths[i][0] for i in overlong)
        truncated = len(overlong) - len(dropped)
        what = "dropped (data.overlong: drop)" if section.overlong == "drop" else ", ".join(
            ([f"{truncated} truncated to {seq_len} tokens"] if truncated else []) +
            ([f"{len(no_loss)} dropped because the prompt alone fills seq_len"] if no_loss else []))
        data.notes.append(f"{split}: {len(overlong)} of {len(rows)} rows exceed train.seq_len {seq_len} tokens "
                          f"(longest {longest}): {what}")
    if len(dropped) == len(rows):
        raise UserError(f"{data.source}: every {split} row is longer than train.seq_len {seq_len} tokens; raise seq_len")
    # A token is a loss target only when a token before it predicts it: position 0 never is. Rows that are all
    # empty strings leave nothing to learn, and training on them would finish "successfully" with zero gradients.
    targets = sum(max(0, min(total, seq_len) - max(start, 1)) for i, (total, start) in enumerate(lengths) if i not in dropped)
    data.stats[f"{split}_loss_tokens"] = targets
    if targets == 0:
        raise UserError(f"{data.source}: no {split} row has a token to learn from (the rows, or their answers with "
                        "nothing before them, are empty); fill in the rows' text")
    return rows.select([i for i in range(len(rows)) if i not in dropped]) if dropped else rows


def token_lengths(row: dict, tokenizer, template: str | None, train_on_prompt: bool) -> tuple[int, int]:
    """(tokens in the row, index of its first loss token), tokenized the way TRL's SFTTrainer does. A preference
    pair counts as its longer sequence, prompt plus chosen or prompt plus rejected (the way TRL's DPOTrainer
    tokenizes each of them, as a prompt and a completion)."""
    if "chosen" in row:
        both = [token_lengths({"prompt": row["prompt"], "completion": row[answer]}, tokenizer, template, train_on_prompt)
                for answer in ("chosen", "rejected")]
        return max(total for total, _ in both), min(start for _, start in both)
    if "messages" in row:
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True, chat_template=template,
                                            return_assistant_tokens_mask=not train_on_prompt)
        mask = out.get("assistant_masks") or [1]
        return len(out["input_ids"]), mask.index(1) if 1 in mask else len(mask)
    if "text" in row:
        text = row["text"] if row["text"].endswith(tokenizer.eos_token) else row["text"] + tokenizer.eos_token
        return len(tokenizer(text)["input_ids"]), 0
    ids, start = completion_ids(row["prompt"], row["completion"], tokenizer)
    return len(ids), 0 if train_on_prompt else start


def completion_ids(prompt, completion, tokenizer) -> tuple[list[int], int]:
    """The ids of prompt + completion as TRL's trainers tokenize them (chat template for message lists, EOS after
    a text completion), and the index where the completion starts: where the ids of the prompt alone and of
    prompt + completion part, as TRL finds it."""
    if isinstance(prompt, list):
        alone = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
    else:
        ending = "" if completion.endswith(tokenizer.eos_token) else tokenizer.eos_token
        alone, full = tokenizer(prompt), tokenizer(prompt + completion + ending)
    return list(full["input_ids"]), _common_prefix(alone["input_ids"], full["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def describe_data(data: Data) -> str:
    return "\n".join(["  data      " + data.notes[0]] + [f"            {note}" for note in data.notes[1:]])
