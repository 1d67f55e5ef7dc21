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


def make_dirs(path: Path) -> list[Path]:
    """Make `path` and its missing parents, as `mkdir -p` would; return the ones this call made, deepest first. A
    directory another process makes at the same moment is theirs: not listed, so never removed by us."""
    made: list[Path] = []
    try:
        for directory in reversed(missing_dirs(path)):
            try:
                directory.mkdir()
            except FileExistsError:
                if not directory.is_dir():
                    raise
                continue
            made.insert(0, directory)
    except BaseException:
        remove_empty(made)  # a failure half-way leaves no parents behind
        raise
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the directories `make_dirs` made: the deepest with what was written in it (the caller holds it: a
    run directory under its lock), its parents only while empty (a parent that now holds something else stays)."""
    if made:
        shutil.rmtree(made[0], ignore_errors=True)
    remove_empty(made[1:])


def remove_empty(made: list[Path]) -> None:
    """Remove the directories `make_dirs` made, deepest first, each only while empty: what another process wrote
    into them meanwhile (an export that won a race for the same parent) stays."""
    for directory in made:
        try:
            directory.rmdir()
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
