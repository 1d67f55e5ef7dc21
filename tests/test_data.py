"""Data on the tiny model with the real datasets and TRL: every format and file type, the loss mask token by
token through TRL's own collator, chat templates, long rows, bad rows, packing and eval metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import resolved_on_cpu, run_cli

from qlora_trainer.config.recipe_files import validate
from qlora_trainer.dataset.data import load_data
from qlora_trainer.dataset.sequence_fit import describe_data, fit_to_tokenizer, token_lengths
from qlora_trainer.errors import UserError
from qlora_trainer.loading.model import load_base_model, load_tokenizer
from qlora_trainer.training.trainer_setup import build_trainer

IM_START, IM_END, EOS, PAD = 4, 5, 2, 3  # the tiny tokenizer's special tokens (conftest.py)
CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "my bill"},
        {"role": "assistant", "content": "sorry"}, {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "thanks"}]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def make_recipe(model_dir, path, seq_len=64, batch=4, **data):
    train = {k: data.pop(k) for k in ("packing", "padding_free") if k in data}
    return validate({"model": {"name_or_path": str(model_dir)}, "data": {"path": str(path), **data},
                     "train": {"seq_len": seq_len, "micro_batch_size": batch, "gradient_accumulation_steps": 1,
                               "max_steps": 2, "logging_steps": 1, "eval_steps": 1, "save_steps": 100, **train}}, "test")


def prepared(model_dir, path, tmp_path, seq_len=64, batch=4, **data):
    """Recipe -> rows -> tokenizer step -> the real SFTTrainer; returns trainer, data, tokenizer."""
    recipe = make_recipe(model_dir, path, seq_len, batch, **data)
    rows = load_data(recipe.data, seed=0)
    tokenizer = load_tokenizer(recipe.model)
    rows = fit_to_tokenizer(rows, recipe.data, tokenizer, seq_len, str(model_dir))
    (tmp_path / "run").mkdir(exist_ok=True)
    trainer = build_trainer(resolved_on_cpu(recipe, rows), load_base_model(recipe.model, recipe.quantization, "cpu"), tokenizer, rows,
                            tmp_path / "run", "cpu")
    return trainer, rows, tokenizer


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def assert_loss_only_on(batch, expected_masks):
    """labels == input_ids where expected, -100 everywhere else (prompt and padding), token by token."""
    for ids, labels, expected in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), expected_masks):
        want = [i if keep else -100 for i, keep in zip(ids, expected + [False] * (len(ids) - len(expected)))]
        assert labels == want


def test_prompt_completion_loss_is_on_the_completion_and_eos_only(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Tweet: my bill is late\nLabel:", "completion": " complaint"},
            {"prompt": "Tweet: love it\nLabel:", "completion": " no complaint"}]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path)
    assert trainer.args.shuffle_dataset is False and "template: none" in describe_data(data)
    masks = []
    for row in rows:  # independent of TRL: the prompt's own tokens, then the completion and EOS
        prompt = tok(row["prompt"])["input_ids"]
        full = tok(row["prompt"] + row["completion"])["input_ids"] + [EOS]
        assert full[:len(prompt)] == prompt
        masks.append([False] * len(prompt) + [True] * (len(full) - len(prompt)))
    batch = first_batch(trainer)
    order = [0, 1] if len(masks[0]) == int(batch["attention_mask"][0].sum()) else [1, 0]
    assert_loss_only_on(batch, [masks[i] for i in order])
    assert (batch["labels"] == EOS).sum() == 2, "each EOS is trained"


def test_alpaca_rows_get_the_alpaca_prompt(tiny_model_dir, tmp_path):
    rows = [{"instruction": "Label it", "input": "my bill", "output": "complaint"}, {"instruction": "Say hi", "output": "hi"}]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "a.jsonl", rows), tmp_path, seq_len=256)
    assert data.format == "alpaca" and "the Alpaca prompt" in describe_data(data)
    assert data.train[0]["prompt"].startswith("Below is an instruction") and "### Input:\nmy bill" in data.train[0]["prompt"]
    for ids, labels in zip(first_batch(trainer)["input_ids"].tolist(), first_batch(trainer)["labels"].tolist()):
        trained = [i for i, label in zip(ids, labels) if label != -100]
        assert tok.decode(trained) in ("complaint</s>", "hi</s>")


def chatml_assistant_mask(ids):
    """Expected loss mask under ChatML: the assistant's content and its <|im_end|>, nothing else."""
    mask, role, in_header, in_assistant = [], [], False, False
    for token in ids:
        if token == IM_START:
            in_header, role = True, []
            mask.append(False)
        elif in_header:
            role.append(token)
            in_header = "\n" not in TOKENIZER.decode([token])
            in_assistant = not in_header and TOKENIZER.decode(role).strip() == "assistant"
            mask.append(False)
        else:
            mask.append(in_assistant)
            in_assistant = in_assistant and token != IM_END
    return mask


TOKENIZER = None


def test_messages_train_on_assistant_turns_only(tiny_model_dir, tmp_path):
    global TOKENIZER
    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path, seq_len=128)
    TOKENIZER = tok
    assert "chat template: chatml (the tokenizer's template renders exactly like it" in describe_data(data)
    assert trainer.args.assistant_only_loss
    batch = first_batch(trainer)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        real = [i for i in ids if i != PAD]
        expected = chatml_assistant_mask(real)
        assert sum(expected) > 0
        assert labels == [i if keep else -100 for i, keep in zip(ids, expected + [False] * (len(ids) - len(real)))]
    decoded = {tok.decode([i for i, label in zip(ids, labels) if label != -100])
               for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist())}
    assert decoded == {"sorry<|im_end|>thanks<|im_end|>", "sorry<|im_end|>"}


def test_sharegpt_with_the_alpaca_template_trains_answers_and_eos(tiny_model_dir, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "my bill"}, {"from": "gpt", "value": "sorry"}]}]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "sg.jsonl", rows), tmp_path, seq_len=256,
                                  chat_template="alpaca")
    assert data.format == "sharegpt" and data.train[0]["messages"][1] == {"role": "assistant", "content": "sorry"}
    assert "chat template: alpaca (data.chat_template)" in describe_data(data)
    batch = first_batch(trainer)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tok.decode([i for i, label in zip(ids, labels) if label != -100]) == "sorry</s>"
    assert tok.decode(ids).startswith("Below is an instruction")


def test_prompt_completion_message_lists_and_column_mapping(tiny_model_dir, tmp_path):
    rows = [{"question": [{"role": "user", "content": "my bill"}], "answer": [{"role": "assistant", "content": "sorry"}]}]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "pc.jsonl", rows), tmp_path,
                                  columns={"prompt": "question", "completion": "answer"})
    assert data.format == "prompt_completion"
    batch = first_batch(trainer)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tok.decode([i for i, label in zip(ids, labels) if label != -100]) == "sorry<|im_end|>\n"


def test_text_rows_train_on_everything(tiny_model_dir, tmp_path):
    trainer, data, _ = prepared(tiny_model_dir, write_jsonl(tmp_path / "t.jsonl", [{"text": "my bill is late"}]), tmp_path)
    batch = first_batch(trainer)
    assert data.format == "text" and batch["labels"][0].tolist() == batch["input_ids"][0].tolist()
    assert batch["input_ids"][0].tolist()[-1] == EOS


def test_train_on_prompt_trains_every_real_token(tiny_model_dir, tmp_path):
    trainer, _, _ = prepared(tiny_model_dir, write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), tmp_path,
                             seq_len=128, train_on_prompt=True)
    batch = first_batch(trainer)
    assert batch["labels"][0].tolist() == batch["input_ids"][0].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json", "dir"])
def test_file_types(tmp_path, suffix, tiny_model_dir):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]})
    if suffix == ".csv":
        path = tmp_path / "rows.csv"
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        path = tmp_path / "rows.parquet"
        frame.to_parquet(path)
    elif suffix == ".json":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(frame.to_dict("records")))
    else:
        path = tmp_path / "parts"
        path.mkdir()
        write_jsonl(path / "a.jsonl", frame.to_dict("records")[:2])
        write_jsonl(path / "b.jsonl", frame.to_dict("records")[2:])
    data = load_data(make_recipe(tiny_model_dir, path).data, seed=0)
    assert data.train.to_list() == frame.to_dict("records")


def test_detected_format_is_recorded_and_an_explicit_one_is_checked(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "a"}])
    recipe = make_recipe(tiny_model_dir, path)
    data = load_data(recipe.data, 0)
    assert data.recipe_format == "text" and recipe.data.format == "auto", "found, and the recipe left as written"
    assert resolved_on_cpu(recipe, data).data.format == "text", "the resolved recipe (recipe.yaml) records it"
    with pytest.raises(UserError, match="data.format is alpaca but the rows have no instruction, output field"):
        load_data(make_recipe(tiny_model_dir, path, format="alpaca").data, 0)


@pytest.mark.parametrize("content, message", [
    (None, "data.path: {path} does not exist"),
    (b"", "{path}: the file has no rows"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion"\n', "{path}:2: invalid JSON"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', "{path}:2: field 'completion' must be a string, got nothing"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 5}\n', "{path}:2: field 'completion' must be a string or a list of messages, got int"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "d"}\n', "{path}:2: not UTF-8 (byte 16 of the line)"),
    (b'{"messages": [{"role": "user", "content": "a"}]}\n', "{path}:1: field 'messages' has no assistant turn"),
    (b'{"messages": [{"role": "bot", "content": "a"}]}\n', "{path}:1: field 'messages[0].role' is 'bot'"),
])
def test_bad_jsonl_names_file_line_and_field(tiny_model_dir, tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_data(make_recipe(tiny_model_dir, path).data, 0)
    assert str(err.value).startswith(message.format(path=path)), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_csv_names_the_line(tiny_model_dir, tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"prompt,completion\na,b\ncaf\xe9,d\n")
    with pytest.raises(UserError, match=rf"^{path}:3: not UTF-8"):
        load_data(make_recipe(tiny_model_dir, path).data, 0)
    path.write_bytes(b"question,completion\na,b\n")
    with pytest.raises(UserError, match="cannot tell the data format .* map other column names with data.columns"):
        load_data(make_recipe(tiny_model_dir, path).data, 0)


def test_bad_data_from_the_command_line_exits_2_without_a_summary(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}])
    result = run_cli("--recipe", "tiny-demo", "--output-dir", str(tmp_path / "run"), "--set", f"data.path={path}",
                     "--set", "eval.exact_match=false", "--set", "data.eval_path=null")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:2: field 'completion' must be a string or a list of messages, got int" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_skip_counts_bad_rows_and_stops_past_the_limit(tiny_model_dir, tmp_path):
    good = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(18)]
    path = write_jsonl(tmp_path / "rows.jsonl", good + ['{"prompt": ', {"prompt": "x"}])
    data = load_data(make_recipe(tiny_model_dir, path, on_bad_rows="skip").data, 0)
    assert len(data.train) == 18 and data.stats["train_skipped_rows"] == 2
    assert data.stats["train_skip_reasons"] == {"invalid JSON": 1, "field 'completion' must be a string, got nothing": 1}
    assert "skipped 2 of 20 bad rows (10.0%)" in describe_data(data) and f"first: {path}:19" in describe_data(data)
    with pytest.raises(UserError, match=r"2 of 20 rows \(10%\) are bad .* more than data.max_bad_fraction 0.05"):
        load_data(make_recipe(tiny_model_dir, path, on_bad_rows="skip", max_bad_fraction=0.05).data, 0)


def test_duplicates_and_empty_answers_are_counted(tiny_model_dir, tmp_path):
    rows = [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "c", "completion": " "}]
    data = load_data(make_recipe(tiny_model_dir, write_jsonl(tmp_path / "r.jsonl", rows)).data, 0)
    assert data.stats["train_duplicate_rows"] == 2 and data.stats["train_empty_answers"] == 1
    assert "2 duplicate rows" in describe_data(data) and "1 rows with an empty answer" in describe_data(data)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_long_rows_are_counted_and_truncated_or_dropped(tiny_model_dir, tmp_path, overlong):
    rows = [{"prompt": "Tweet: hi\nLabel:", "completion": " complaint"},
            {"prompt": "Tweet: " + "my bill is late " * 8 + "\nLabel:", "completion": " complaint"},
            {"prompt": "Tweet: hi", "completion": " no complaint " * 20}]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "r.jsonl", rows), tmp_path, seq_len=24, overlong=overlong)
    lengths = [token_lengths(r, tok, None, False) for r in rows]
    assert lengths[0][0] <= 24 < lengths[1][1] and lengths[2][1] < 24 < lengths[2][0]
    assert data.stats["train_overlong_rows"] == 2
    prepared_lengths = sorted(len(r["input_ids"]) for r in trainer.train_dataset)
    if overlong == "truncate":
        assert data.stats["train_truncated_rows"] == 1 and data.stats["train_dropped_rows"] == 1
        assert "2 of 3 rows exceed train.seq_len 24 tokens" in describe_data(data)
        assert "1 dropped because the prompt alone fills seq_len" in describe_data(data)
        assert prepared_lengths == [lengths[0][0], 24], "TRL tokenizes as we measured, and truncates to seq_len"
    else:
        assert data.stats["train_dropped_rows"] == 2 and "dropped (data.overlong: drop)" in describe_data(data)
        assert prepared_lengths == [lengths[0][0]]


def test_packing_keeps_rows_apart(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Tweet: my bill number {i} is late\nLabel:", "completion": " complaint"} for i in range(6)]
    trainer, data, tok = prepared(tiny_model_dir, write_jsonl(tmp_path / "r.jsonl", rows), tmp_path, seq_len=64,
                                  batch=1, packing=True)
    batch = first_batch(trainer)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2 and "attention_mask" not in batch, "several rows in one padding-free sequence"
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        second = slice(starts[1], starts[2] if len(starts) > 2 else batch["input_ids"].shape[1])
        alone = model(input_ids=batch["input_ids"][:, second], use_cache=False).logits[0]
        # The same sequence as one row: the second row attends to the first. What a leak looks like.
        leaked = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    # bf16 kernels over different shapes round differently (on CPUs with AVX512-BF16 by up to ~0.01): a packed row
    # must match its row alone within that, and far closer than the leak.
    error = (packed[second].float() - alone.float()).abs().max().item()
    leak = (leaked[second].float() - alone.float()).abs().max().item()
    assert error < 0.05 and error < 0.1 * leak, f"a packed row attended to another: {error:.4f} vs leak {leak:.4f}"
    assert all(batch["labels"][0, s] == -100 for s in starts)


def test_no_chat_template_needs_one_from_the_recipe(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    recipe = make_recipe(tiny_model_dir, path)
    data, tok = load_data(recipe.data, 0), load_tokenizer(recipe.model)
    tok.chat_template = None
    with pytest.raises(UserError, match="has no chat template.*set data.chat_template to one of chatml, alpaca"):
        fit_to_tokenizer(data, recipe.data, tok, 64, "base-model")
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with pytest.raises(UserError, match="does not mark the assistant turns.*data.train_on_prompt: true"):
        fit_to_tokenizer(load_data(recipe.data, 0), recipe.data, tok, 64, "odd-model")


def test_eval_loss_and_perplexity_are_logged(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Tweet: bill {i}\nLabel:", "completion": " complaint"} for i in range(12)]
    trainer, data, _ = prepared(tiny_model_dir, write_jsonl(tmp_path / "r.jsonl", rows), tmp_path, eval_fraction=0.25)
    assert (len(data.train), len(data.eval)) == (9, 3)
    trainer.train()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)


def test_padding_free_without_packing_needs_drop(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="train.padding_free without train.packing needs data.overlong: drop"):
        make_recipe(tiny_model_dir, tmp_path / "r.jsonl", padding_free=True)


def test_a_malformed_csv_is_one_line_and_datasets_is_left_as_it_was(tmp_path):
    """datasets logs its own parse error and draws a progress bar: neither may add to our one line, and the
    logging and progress-bar settings of a program that imports us come back as they were."""
    from datasets.utils import logging as datasets_logging

    bad = tmp_path / "rows.csv"
    bad.write_text("prompt,completion\na,b\nx,y,z,w\n")
    proc = run_cli("--recipe", "tiny-demo", "--set", f"data.path={bad}", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qlora-trainer: error:")]
    assert errors == [f"qlora-trainer: error: {bad}: cannot parse as csv (Error tokenizing data. C error: Expected 2 "
                      "fields in line 3, saw 4)"], proc.stderr
    assert "Failed to read file" not in proc.stderr and "Generating train split" not in proc.stderr, proc.stderr
    before = datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    with pytest.raises(UserError, match="cannot parse as csv"):
        load_data(validate({"model": {"name_or_path": "m"}, "data": {"path": str(bad)}}, "test").data, 0)
    assert (datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()) == before
