"""Files we are handed that turn out to be damaged (cut short by a full disk or an interrupted copy): one UserError
naming the file and the fix, instead of the parsing library's exception with no file name in it."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_trainer.errors import UserError, first_line


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold one object (adapter_config.json, summary.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"{path} is damaged ({first_line(err)}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (it holds a JSON {type(data).__name__}, not an object); {fix}")
    return data


def damaged_safetensors(paths: list[Path]) -> tuple[Path, str] | None:
    """The first safetensors file whose header does not read, with the reason. Opening checks the header against
    the file's length, so a file cut short anywhere is caught without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    for path in paths:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return path, first_line(err)
    return None


def check_safetensors(paths: list[Path], fix: str) -> None:
    found = damaged_safetensors(paths)
    if found is not None:
        raise UserError(f"{found[0]} is damaged ({found[1]}); {fix}")


def safetensors_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
