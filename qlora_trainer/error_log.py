"""Where the traceback of an unexpected error is kept, so the terminal shows one line and a bug report has it all.

A run that failed after its first optimizer step keeps its run directory: the traceback goes to `error.log` there,
beside the checkpoints it concerns. Everything else (a run that failed earlier removes its directory, and export,
generate and estimate have none) writes under the cache directory, `$QLORA_TRAINER_CACHE/errors/`, which is ours
to write and outlives the failed command; a file beside the output would look like part of it.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

RUN_LOG = "error.log"


def log_path(run_dir: Path | None, rank: int) -> Path:
    """error.log in a kept run directory (error-rank<N>.log for the other processes of a launch), else a new file
    under the cache directory."""
    if run_dir is not None:
        return run_dir / (RUN_LOG if rank == 0 else f"error-rank{rank}.log")
    from qlora_trainer.files.cache import cache_dir

    return cache_dir() / "errors" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"


def write_error_log(path: Path, traceback_text: str, argv: list[str]) -> Path | None:
    """The command, the library versions and the traceback; None where the log itself cannot be written."""
    header = [f"command: qlora-trainer {' '.join(argv)}", f"time: {datetime.now().isoformat(timespec='seconds')}",
              f"python: {sys.version.split()[0]}", f"versions: {_versions()}", ""]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(header) + traceback_text, encoding="utf-8")
    except OSError:
        return None
    return path


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("qlora-trainer", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)
