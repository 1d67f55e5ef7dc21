"""The README.md beside an adapter: what it is, what it was trained on, how to use it. Machine paths stay out of it:
a card travels with the adapter to other machines and to the hub, where /home/you/... means nothing."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.files.local_path import looks_local


def shown_name(name_or_path: str) -> str:
    """A hub id or `demo:` name as it is; a local path by its last part (`/data/sql/train.jsonl` -> `train.jsonl`)."""
    return Path(name_or_path).name if looks_local(name_or_path) else name_or_path


def adapter_name(adapter_dir: Path) -> str:
    """An adapter directory by the run that made it (`runs/sql-20261122/adapter` -> `sql-20261122/adapter`)."""
    return f"{adapter_dir.parent.name}/{adapter_dir.name}" if adapter_dir.name == "adapter" else adapter_dir.name


def adapter_card(recipe, recipe_name: str, summary: dict) -> str:
    base, data = shown_name(recipe.model.name_or_path), shown_name(recipe.data.path)
    lora, t = recipe.lora, recipe.train
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    lines = [f"# QLoRA adapter for {base}", "",
             f"Trained by qlora-trainer with the recipe `{shown_name(recipe_name)}`: a 4-bit "
             f"{recipe.quantization.quant_type} base through bitsandbytes, LoRA through PEFT, TRL's SFTTrainer.", "",
             f"- base model: `{base}`",
             f"- LoRA: r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, on {targets}; "
             f"{summary.get('trainable_params', 0):,} trainable parameters",
             f"- data: `{data}` ({summary.get('data_format', recipe.data.format)} rows), seq_len {t.seq_len}",
             f"- training: {summary.get('steps')} steps, loss {_number(summary.get('first_loss'))} -> "
             f"{_number(summary.get('final_loss'))}"]
    if summary.get("exact_match_after") is not None:
        lines.append(f"- held-out exact match: {_percent(summary.get('exact_match_before'))} before training, "
                     f"{_percent(summary['exact_match_after'])} after")
    lines += ["", "## Use it", "", "```bash",
              "python -m qlora_trainer generate ADAPTER_DIR --prompt '...'      # the 4-bit base + this adapter",
              "python -m qlora_trainer export ADAPTER_DIR --output merged/      # merged fp16 weights, verified",
              "```", "",
              "With PEFT alone: `PeftModel.from_pretrained(base_model, ADAPTER_DIR)` over the base loaded in 4-bit "
              "NF4 as above (the adapter learned to correct those rounded weights)."]
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _percent(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"
