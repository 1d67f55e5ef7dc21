"""Our own cache directory: demo models, error logs and model shapes live under `$QLORA_TRAINER_CACHE`
(default ~/.cache/qlora_trainer)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_TRAINER_CACHE") or Path.home() / ".cache" / "qlora_trainer")
