"""The run directory (DESIGN.md): where it goes, what may already be there, and atomic writes into it.

A run directory is complete only when `summary.json` exists, and it is written last. Every file is written
to a temporary name and renamed, so a crash never leaves a file that looks whole but is not.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from qlora_trainer.errors import UserError
from qlora_trainer.files.made_dirs import make_dirs, remove_made
from qlora_trainer.files.staging import held

SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
# What every run writes before anything else (train.py): a directory without them is not a run to resume.
RUN_MARKERS = ("recipe.yaml", "estimate.json")


def default_run_dir(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(path: Path, resume: bool, hold: ExitStack) -> list[Path]:
    """Create (or, with resume, reopen) the run directory and hold its lock in `hold` for as long as the run lasts,
    so that a second run or resume into it is refused, not mixed in; refuse to overwrite anything. Returns the
    directories it made (the run directory and missing parents, deepest first): a run that fails before its first
    step removes them. The checks that another run could change are made once the lock is held."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--output-dir {path} is a file, not a directory; choose a directory path for the run")
    if resume:
        _check_is_run(path)
    try:
        made = make_dirs(path)
    except OSError as err:
        raise UserError(f"--output-dir {path}: cannot write there ({err.strerror}); choose a writable directory") from None
    try:
        hold.enter_context(held(path, wait=False))
    except BlockingIOError:
        # Whatever we made, the other run now uses: take nothing away.
        raise UserError(f"--output-dir {path} is in use by another run (started at the same time, or still "
                        "training); wait for it to end or choose another --output-dir") from None
    try:
        _check_free(path, resume, made)
    except BaseException:
        remove_made(made)  # ours alone: we hold the lock
        raise
    return made


def _check_is_run(path: Path) -> None:
    """--resume continues a run: a directory that is not one (`--output-dir .`, the user's own project) would be
    trained into, and its recipe.yaml replaced by the run's."""
    if not path.is_dir():
        raise UserError(f"--resume: {path} is not a run directory; pass the --output-dir of the run to continue")
    missing = [name for name in RUN_MARKERS if not (path / name).is_file()]
    if missing:
        raise UserError(f"--resume: {path} is not a run directory (no {' or '.join(missing)}, which every run writes "
                        "first); pass the --output-dir of the run to continue, or drop --resume to start a new run")


def _check_free(path: Path, resume: bool, made: list[Path]) -> None:
    if (path / SUMMARY).exists():
        raise UserError(f"--output-dir {path} already holds a finished run (summary.json); choose another --output-dir")
    if resume:
        return
    if path not in made and any(path.iterdir()):
        raise UserError(f"--output-dir {path} already exists and is not empty; add --resume to continue that run "
                        "or choose another --output-dir")
    try:
        probe = path / ".write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as err:
        raise UserError(f"--output-dir {path}: cannot write there ({err.strerror}); choose a writable directory") from None


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete trainer checkpoint (one with trainer_state.json) under the run's checkpoints/."""
    found = complete_checkpoints(path)
    return found[0] if found else None


def complete_checkpoints(path: Path) -> list[Path]:
    """The run's complete checkpoints (those with trainer_state.json), newest first."""
    found = [(int(p.name.split("-")[-1]), p) for p in (path / CHECKPOINTS).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def umask_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() gives a new file or directory (0666 or 0777 less the umask), as save_pretrained's
    files get. mkstemp and mkdtemp create 0600 and 0700 whatever the umask: a server or another user could not read
    what we write."""
    mask = os.umask(0o022)  # reading the umask means setting it; the value is put straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain open() and mkdir() would. safetensors (0.8) writes its
    files 0600 whatever the umask, and mkdtemp makes 0700 directories: a server or another user could not read
    an adapter or an export."""
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")

