"""Where a trained adapter and its base come from: a run directory, an adapter directory, or a merged export.
Shared by `export`, `generate` and the multi-adapter API, and the place where a mismatched base is refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlora_trainer.config.recipe import ModelSection, QuantizationSection, Recipe
from qlora_trainer.dataset import formats
from qlora_trainer.errors import UserError, first_line
from qlora_trainer.files.damaged_files import check_safetensors, read_json_object

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class AdapterSource:
    adapter_dir: Path
    base: ModelSection
    quantization: QuantizationSection
    recipe: Recipe | None  # present for a run directory
    data_format: str | None  # the training rows' format, from the run summary
    data_conversational: bool = False  # whether those rows were chat turns (rendered with the chat template)


def find_adapter(path: Path, base_override: str | None = None) -> AdapterSource:
    """Accept RUN_DIR (recipe.yaml + adapter/) or ADAPTER_DIR (adapter_config.json + weights)."""
    from qlora_trainer.config.recipe_files import load_recipe

    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory or an adapter directory")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a directory; pass a run directory or an adapter directory")
    recipe = None
    adapter_dir = path
    if (path / "recipe.yaml").is_file():
        recipe, _ = load_recipe(str(path / "recipe.yaml"))  # one-line errors for a damaged file, as for any recipe
        adapter_dir = path / "adapter"
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        hint = " (the run has not finished: no adapter/ yet)" if recipe is not None else ""
        raise UserError(f"{adapter_dir}: missing {', '.join(missing)}{hint}; pass a finished run or an adapter directory")
    fix = "train or copy the adapter again" + (f" (a run's last checkpoint is in {path / 'checkpoints'})" if recipe else "")
    config = read_json_object(adapter_dir / "adapter_config.json", fix)
    check_safetensors([adapter_dir / "adapter_model.safetensors"], fix)
    if recipe is not None:
        base, quantization = recipe.model, recipe.quantization
    else:
        base, quantization = ModelSection(name_or_path=config.get("base_model_name_or_path") or ""), QuantizationSection()
    if base_override:
        base = base.model_copy(update={"name_or_path": base_override})
    if not base.name_or_path:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model; pass --base PATH")
    summary_path = path / "summary.json"
    summary = read_json_object(summary_path, f"restore it, or pass the adapter directory {adapter_dir}") \
        if summary_path.is_file() else {}
    return AdapterSource(adapter_dir, base, quantization, recipe, summary.get("data_format"), _conversational(summary))


def _conversational(summary: dict) -> bool:
    """Whether the run trained on chat turns. A summary written before it said so directly still names the template
    its rows got: a chat template's name, or the description its format gives rows used as written."""
    if "data_conversational" in summary:
        return bool(summary["data_conversational"])
    fmt, template = formats.find(summary.get("data_format")), (summary.get("data") or {}).get("template")
    return fmt is not None and template is not None and template != fmt.plain_template()


def load_adapter_tokenizer(source: AdapterSource):
    """The tokenizer saved with the adapter (with the chat template training used), else the base model's."""
    from transformers import AutoTokenizer

    from qlora_trainer.loading.model import load_tokenizer

    try:
        return AutoTokenizer.from_pretrained(source.adapter_dir)
    except (OSError, ValueError) as err:
        saved = [name for name in ("tokenizer.json", "tokenizer_config.json") if (source.adapter_dir / name).is_file()]
        if saved:  # a tokenizer was saved and is damaged: the base's may lack the chat template training used
            raise UserError(f"{source.adapter_dir}: its tokenizer ({', '.join(saved)}) will not load ({first_line(err)}); "
                            "copy the adapter again, or delete those files to use the base model's") from None
        print(f"{source.adapter_dir} holds no tokenizer; using the base model's", flush=True)
        return load_tokenizer(source.base)


def is_merged_model(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file() and not (path / "recipe.yaml").is_file()
