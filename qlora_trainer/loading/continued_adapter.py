"""model.adapter: the adapter a run continues (an SFT run's, or any PEFT LoRA adapter directory). It is checked
against the base before the run directory exists, and its LoRA settings become the recipe's: a continued adapter
keeps its own rank, scaling and target layers."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.config.recipe import LoraSection, Recipe
from qlora_trainer.errors import UserError
from qlora_trainer.files.damaged_files import check_safetensors, read_json_object
from qlora_trainer.loading import base_fingerprint
from qlora_trainer.loading.adapter_shapes import check_adapter_matches

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Our lora key -> PEFT's adapter_config.json key.
LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
             "use_rslora": "use_rslora", "use_dora": "use_dora"}
FIX = "train or copy the adapter again"


def adapter_dir(value: str) -> Path:
    """RUN (a finished run: its adapter/) or DIR (adapter_config.json and adapter_model.safetensors)."""
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise UserError(f"model.adapter: {value} {what}; pass a finished run directory or an adapter directory")
    run = (path / "recipe.yaml").is_file()
    directory = path / "adapter" if run else path
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        hint = " (the run has not finished: no adapter/ yet)" if run else ""
        raise UserError(f"model.adapter: {directory} has no {', '.join(missing)}{hint}; pass a finished run "
                        "directory or an adapter directory")
    return directory


def adopt(recipe: Recipe, base_config) -> Recipe:
    """Check model.adapter (its files, its shapes against the base, the base's fingerprint) and return the recipe
    with the adapter's LoRA settings. A lora key the recipe sets to something else is an error naming it."""
    directory = adapter_dir(recipe.model.adapter)
    config = read_json_object(directory / "adapter_config.json", FIX)
    check_safetensors([directory / "adapter_model.safetensors"], FIX)
    if config.get("peft_type") != "LORA":
        raise UserError(f"model.adapter: {directory} holds a {config.get('peft_type')} adapter; only LoRA adapters "
                        "can be continued")
    other_base = "set model.name_or_path to the base it was trained on"
    check_adapter_matches(directory, base_config, recipe.model.name_or_path, fix=other_base)
    base_fingerprint.check(directory, recipe.model, "model.adapter", other_base_fix=other_base)
    defaults, settings = LoraSection(), {}
    for ours, theirs in LORA_KEYS.items():
        saved = config.get(theirs, getattr(defaults, ours))
        saved = sorted(saved) if isinstance(saved, list) else saved  # PEFT writes the set of target names
        current = getattr(recipe.lora, ours)
        if current != getattr(defaults, ours) and current != saved:
            raise UserError(f"lora.{ours} is {current!r} but model.adapter {directory} was trained with {saved!r}; a "
                            f"continued adapter keeps its own LoRA settings: remove lora.{ours} from the recipe")
        settings[ours] = saved
    raw = recipe.model_dump(mode="json")
    raw["lora"].update(settings)
    return Recipe.model_validate(raw)
