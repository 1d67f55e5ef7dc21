"""KTO's rows from preference pairs. What preference and KTO rows hold, and which train.method takes them, is in
formats.py with every other row format."""

from __future__ import annotations

from qlora_trainer.dataset.formats import KTO


def unpaired(pairs):
    """KTO's rows from preference pairs: each pair gives a desirable and an undesirable row, as TRL's
    unpair_preference_dataset does."""
    from datasets import Dataset

    if "label" in pairs.column_names:
        return pairs
    prompt, completion, label = KTO.fields
    rows = [{prompt: row["prompt"], completion: row[answer], label: answer == "chosen"}
            for row in pairs for answer in ("chosen", "rejected")]
    return Dataset.from_list(rows)
