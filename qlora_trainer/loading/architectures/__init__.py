"""Configs of the models people fine-tune, so estimates work offline by name (`--model llama-2-7b`), by hub id
of a known model (`meta-llama/Llama-2-7b-hf`), or by size (`--model-size 7B`).

Each JSON file is the model's published `config.json` plus `_source` (where the values come from) and
`_hub_ids` (repositories that share the architecture). Parameter counts on the meta device equal the
published sizes exactly (checked when the files were written).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The family `--model-size` picks for each size: the most fine-tuned model of that size today.
DEFAULT_FOR_SIZE = {
    "0.5B": "qwen2.5-0.5b", "0.6B": "qwen3-0.6b", "1B": "llama-3.2-1b", "1.5B": "qwen2.5-1.5b", "1.7B": "qwen3-1.7b",
    "2B": "gemma-2-2b", "3B": "qwen2.5-3b", "4B": "phi-3-mini",
    "7B": "llama-2-7b", "8B": "llama-3.1-8b", "9B": "gemma-2-9b", "12B": "mistral-nemo-12b", "13B": "llama-2-13b", "14B": "qwen2.5-14b",
    "27B": "gemma-2-27b", "32B": "qwen2.5-32b", "33B": "llama-33b", "65B": "llama-65b", "70B": "llama-2-70b",
    "72B": "qwen2.5-72b",
}


def known_architectures() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


@cache
def architecture_text(name: str) -> str:
    return (HERE / f"{name}.json").read_text(encoding="utf-8")


def _raw(name: str) -> dict:
    return json.loads(architecture_text(name))


def architecture_for(name_or_hub_id: str) -> str | None:
    """The known architecture with this name or hub id, if any."""
    if name_or_hub_id.lower() in known_architectures():
        return name_or_hub_id.lower()
    for name in known_architectures():
        if name_or_hub_id in _raw(name)["_hub_ids"]:
            return name
    return None


def check_known(name: str, what: str) -> None:
    """Refuse a name that is not a known architecture (`what`: where it was given, e.g. --arch), naming the
    nearest one and all of them."""
    import difflib

    from qlora_trainer.errors import UserError

    known = known_architectures()
    if name not in known:
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{what} {name!r} is not a known architecture; {hint}known: {', '.join(known)}")


def load_architecture(name: str):
    """A transformers config for a known architecture."""
    from transformers import AutoConfig

    check_known(name, "architecture")
    values = {k: v for k, v in _raw(name).items() if not k.startswith("_")}
    return AutoConfig.for_model(values.pop("model_type"), **values)
