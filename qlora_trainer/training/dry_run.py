"""What `--dry-run` could check on this machine and what it could not, said plainly: a dry run that ends
"valid" must mean that the real run gets past everything short of loading the weights."""

from __future__ import annotations

from qlora_trainer.config.recipe import Recipe
from qlora_trainer.dataset.data import Data, is_hub_id
from qlora_trainer.files.hub_cache import in_hub_cache
from qlora_trainer.loading.model import resolve_model_path


def readable_here(recipe: Recipe, unchecked: list[str]) -> bool:
    """Whether the rows and the tokenizer are on this machine; adds what is not to `unchecked`. A dry run
    downloads nothing, so a hub dataset or model that is not cached cannot be read."""
    missing = [f"data.{key} '{value}': a hub dataset not in the local cache (the run downloads and checks it)"
               for key, value in (("path", recipe.data.path), ("eval_path", recipe.data.eval_path))
               if value and is_hub_id(value) and not in_hub_cache(value, "dataset")]
    model = resolve_model_path(recipe.model)
    if is_hub_id(model) and not in_hub_cache(model, "model"):
        missing.append(f"the tokenizer of '{model}' and the rows' lengths against train.seq_len: the model is not "
                       "in the local cache (the run downloads it)")
    unchecked.extend(missing)
    return not missing


def report(data: Data | None, unchecked: list[str]) -> str:
    """The dry run's last lines."""
    checked = "the recipe, the model's config, the plan and the estimate"
    if data is not None:
        rows = f"{data.stats['train_rows']} training rows" + (
            f" and {data.stats['eval_rows']} eval rows" if data.stats["eval_rows"] else "")
        checked += f", {rows} (fields and lengths, with the tokenizer)"
    lines = [f"Dry run: checked {checked}; stopping before loading weights."]
    lines += [f"  not checked: {gap}" for gap in unchecked]
    return "\n".join(lines)
