"""A fingerprint of a base model's weights, recorded with each run and adapter, so that an adapter is never merged
into, run on or resumed with a base of the same shapes but other weights (another fine-tune of the same
architecture): the shape check passes, the merge "verifies" against that same wrong base, and the result is
silently another model.

Hashing every byte of a 7B checkpoint would take minutes, so the fingerprint hashes each tensor's name and shape
and a few evenly spaced rows' first values, rounded to bf16: a copy saved in another dtype or sharding matches,
a differently trained model does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from qlora_trainer.config.recipe import ModelSection
from qlora_trainer.errors import UserError
from qlora_trainer.files.damaged_files import check_safetensors, read_json_object
from qlora_trainer.loading.weight_files import base_safetensors

FILE = "base_fingerprint.json"
ROWS, VALUES = 4, 16  # rows sampled per tensor, leading values hashed per row


DAMAGED_FIX = "copy or download the model again"
DAMAGED_FIX_WITH_BASE = "copy or download them again, or pass another copy with --base"  # export, generate


def fingerprint(section: ModelSection, fix: str = DAMAGED_FIX) -> str | None:
    """The fingerprint of the base's safetensors weights, or None where there are none on this machine (pickle
    weights, a hub model not in the local cache). A damaged weights file is named, with `fix`."""
    from safetensors import safe_open

    files = base_safetensors(section)  # only what is here: fingerprinting must not download a model
    if not files:
        return None
    # A run fingerprints its base before loading it: a file cut short must be named here, as loading would name it.
    check_safetensors(files, f"the weights of '{section.name_or_path}': {fix}")
    digest = hashlib.sha256()
    tensors = []
    for path in files:
        with safe_open(str(path), "pt") as handle:
            tensors += [(key, path) for key in handle.keys()]
    for key, path in sorted(tensors):
        with safe_open(str(path), "pt") as handle:
            digest.update(f"{key}:{handle.get_slice(key).get_shape()}".encode())
            digest.update(_sample(handle, key).float().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _sample(handle, key: str) -> torch.Tensor:
    """The first VALUES values of ROWS evenly spaced rows (first-dimension slices), read without the rest."""
    piece = handle.get_slice(key)
    shape = piece.get_shape()
    if not shape:
        return handle.get_tensor(key).reshape(1)
    rows = sorted({i * (shape[0] - 1) // (ROWS - 1) for i in range(ROWS)}) if shape[0] > 1 else [0]
    if len(shape) == 1:
        return torch.cat([piece[i:i + 1] for i in rows])
    return torch.cat([piece[i:i + 1].reshape(-1)[:VALUES] for i in rows])


def record(section: ModelSection, run: Path) -> bool:
    """Write the base's fingerprint into the run directory unless it holds one; False where there are no weights
    to fingerprint yet (a hub model is cached only once loading has downloaded it)."""
    from qlora_trainer.files.run_dir import write_json_atomic

    if (run / FILE).is_file():
        return True
    value = fingerprint(section)
    if value is not None:
        write_json_atomic(run / FILE, {"base": section.name_or_path, "sha256": value})
    return value is not None


def save_with_adapter(section: ModelSection, run: Path, adapter_dir: Path) -> None:
    """Put the run's fingerprint beside its adapter, which may be exported or served on its own."""
    from qlora_trainer.files.run_dir import write_text_atomic

    if not record(section, run):
        print(f"note: no safetensors weights of {section.name_or_path} on this machine to fingerprint; export and "
              "generate will not be able to check that they get the base this adapter was trained on", flush=True)
        return
    write_text_atomic(adapter_dir / FILE, (run / FILE).read_text(encoding="utf-8"))


def check(directory: Path, section: ModelSection, what: str, fix: str = DAMAGED_FIX,
          other_base_fix: str = "pass the base it was trained on with --base") -> None:
    """Refuse a base whose weights differ from the ones `directory` (a run or an adapter) recorded. A directory
    from before fingerprints were recorded is accepted with a note."""
    recorded = _read(directory)
    if recorded is None:
        print(f"note: {directory} records no fingerprint of its base's weights (made before qlora-trainer recorded "
              f"one); cannot check that {section.name_or_path} is the base it was trained on", flush=True)
        return
    current = fingerprint(section, fix)
    if current is None:
        print(f"note: no safetensors weights of {section.name_or_path} on this machine to fingerprint; cannot check "
              f"that it is the base {directory} was trained on", flush=True)
        return
    if current != recorded["sha256"]:
        raise UserError(f"{what} {directory} was trained on base '{recorded['base']}' (weights {recorded['sha256'][:12]}) "
                        f"but '{section.name_or_path}' has other weights ({current[:12]}) of the same shapes; "
                        f"{other_base_fix}")


def _read(directory: Path) -> dict | None:
    path = directory / FILE
    if not path.is_file():
        return None
    data = read_json_object(path, "delete it to skip the base check, or copy it again")
    if not isinstance(data.get("sha256"), str) or not isinstance(data.get("base"), str):
        raise UserError(f"{path} is damaged (needs base and sha256); delete it to skip the base check, or copy it again")
    return data
