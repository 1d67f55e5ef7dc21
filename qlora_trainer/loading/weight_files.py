"""Where a base model's weight files are: its local directory, or its snapshot in huggingface_hub's cache.
Loading, the base fingerprint and the export all look here, so that they agree on which files are the model."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.config.recipe import ModelSection
from qlora_trainer.errors import UserError
from qlora_trainer.files.damaged_files import safetensors_of
from qlora_trainer.loading.model_path import resolve_model_path

# What transformers may load weights from; only the first is read without unpickling.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def has_weight_files(directory: Path) -> bool:
    """Whether a model directory holds weights in any format (a config saved alone has none)."""
    return any(next(directory.glob(pattern), None) for pattern in WEIGHT_PATTERNS)


def base_safetensors(section: ModelSection, download: bool = False, fix: str = "") -> list[Path]:
    """The base's safetensors files, sorted. A hub model is read from the cache at `section.revision`; without
    `download` one that is not cached has none ([]), with it one that cannot be fetched is a UserError ending
    in `fix`."""
    path = Path(resolve_model_path(section))
    if path.is_dir():
        return safetensors_of(path)
    from huggingface_hub import snapshot_download

    try:  # the configs come along: a merge that streams the weights still reads them from the same snapshot
        path = Path(snapshot_download(section.name_or_path, revision=section.revision, local_files_only=not download,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as err:  # huggingface_hub raises several types for "not cached" or "cannot fetch"
        if download:
            raise UserError(f"cannot fetch the weights of '{section.name_or_path}' ({err}); {fix}") from None
        return []
    return safetensors_of(path)
