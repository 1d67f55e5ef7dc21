"""Where a recipe's model is: a local directory (checked for its config.json), a hub id, or a built demo model.
Loading, the estimator, the fingerprint and the export all start from this one answer."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.config.recipe import ModelSection
from qlora_trainer.errors import UserError
from qlora_trainer.files.local_path import looks_local
from qlora_trainer.loading.demo_model import demo_model_path, is_demo_model


def resolve_model_path(section: ModelSection) -> str:
    """A local directory, a hub id, or the cached directory of a built demo model."""
    name = section.name_or_path
    if is_demo_model(name):
        return str(demo_model_path(name))
    path = Path(name).expanduser()
    if looks_local(name):
        if not path.is_dir():
            raise UserError(f"model.name_or_path: {name} is not a model directory; pass a hub id or a directory with config.json")
        if not (path / "config.json").is_file():
            raise UserError(f"model.name_or_path: {name} has no config.json; point it at the directory save_pretrained wrote")
        return str(path)
    return name
