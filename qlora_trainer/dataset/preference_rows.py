"""Preference rows: pairs (`prompt`/`chosen`/`rejected`) for dpo, orpo and kto, and KTO's unpaired rows
(`prompt`/`completion`/`label`). Each text field is a string or a list of chat turns, as in prompt/completion rows,
one kind throughout a row and a file. Which row shapes each train.method takes, and the pairs split for KTO."""

from __future__ import annotations

from qlora_trainer.dataset.row_fields import plain_turns, text_or_turns_problem, type_problem
from qlora_trainer.errors import UserError

# The fields each preference format needs; data.detect_format tries them in this order.
PREFERENCE_FIELDS = {"preference": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label")}
# The row formats each method trains on; `auto` only considers these.
METHOD_FORMATS = {"dpo": ("preference",), "orpo": ("preference",), "kto": ("preference", "kto")}
DESCRIBED = {"preference": "prompt/chosen/rejected pairs", "kto": "prompt/completion/label rows"}


def row_problem(row: dict, fmt: str) -> str | None:
    """What is wrong with one preference or KTO row, or None."""
    fields = PREFERENCE_FIELDS[fmt]
    texts = [name for name in fields if name != "label"]
    for name in texts:
        problem = text_or_turns_problem(row, name, needs_assistant=name != "prompt")
        if problem:
            return problem
    if "label" in fields and not isinstance(row.get("label"), bool):
        return type_problem("label", row.get("label"), "true (desirable) or false (undesirable)")
    if len({isinstance(row[name], list) for name in texts}) > 1:
        return f"fields {', '.join(texts)} mix strings and message lists; use one kind in a row"
    if fmt == "preference" and row["chosen"] == row["rejected"]:
        return "fields 'chosen' and 'rejected' are the same answer; a pair needs two different answers"
    return None


def to_trainer_row(row: dict, fmt: str) -> dict:
    return {name: plain_turns(row[name]) if isinstance(row[name], list) else row[name] for name in PREFERENCE_FIELDS[fmt]}


def answer_is_empty(row: dict) -> bool:
    answers = [row[name] for name in ("chosen", "rejected", "completion") if name in row]
    return any(not (a.strip() if isinstance(a, str) else "".join(t["content"] for t in a).strip()) for a in answers)


def formats_for(method: str) -> tuple[str, ...]:
    return METHOD_FORMATS.get(method, ())


def check_method(fmt: str, method: str, source: str) -> None:
    """Refuse rows that the method cannot train on, naming the key that fixes it."""
    if method == "sft" and fmt in PREFERENCE_FIELDS:
        raise UserError(f"{source}: the rows are {DESCRIBED[fmt]} but train.method is sft; set train.method: "
                        f"{'dpo, orpo or kto' if fmt == 'preference' else 'kto'}")
    if method != "sft" and fmt not in METHOD_FORMATS[method]:
        wanted = " or ".join(DESCRIBED[f] for f in METHOD_FORMATS[method])
        raise UserError(f"{source}: train.method {method} trains on {wanted}, but the rows are {fmt} rows; convert "
                        "the data (or map its columns with data.columns), or set train.method: sft")


def unpaired(pairs):
    """KTO's rows from preference pairs: each pair gives a desirable and an undesirable row, as TRL's
    unpair_preference_dataset does."""
    from datasets import Dataset

    if "label" in pairs.column_names:
        return pairs
    rows = [{"prompt": row["prompt"], "completion": row[answer], "label": answer == "chosen"}
            for row in pairs for answer in ("chosen", "rejected")]
    return Dataset.from_list(rows)
