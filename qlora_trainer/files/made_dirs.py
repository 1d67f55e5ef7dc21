"""Directories a command makes, and taking them away again when it fails: a failed command leaves the disk as it
found it, down to the parent directories `mkdir -p` would have made."""

from __future__ import annotations

import shutil
from pathlib import Path


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what making `path` creates."""
    missing = []
    for candidate in [path, *path.parents]:
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    return missing


def remove_made(made: list[Path]) -> None:
    """Remove the directories `missing_dirs` listed before they were made: the deepest with what was written in
    it, its parents only while empty (a parent that now holds something else stays)."""
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    for parent in made[1:]:
        try:
            parent.rmdir()
        except OSError:  # not empty, or already gone: leave it
            pass


def undo(path: Path, made: list[Path]) -> None:
    """Take away what a command wrote in directory `path` and the directories it made (`made`, from `missing_dirs`
    before). A directory that was there before (empty, as a new run's may be) is emptied, not removed."""
    if path in made:
        remove_made(made[made.index(path):])
        return
    if path.is_dir():
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
