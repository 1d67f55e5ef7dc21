"""Directories written beside their destination and renamed into place when whole (an export), and what a writer
that was killed outright (SIGKILL, a power cut: no cleanup ran) leaves of them.

A writer holds an exclusive lock (flock) on its staging directory `.NAME.tmp-XXXX` while it writes; the kernel
drops the lock when the process dies however it dies. The next writer of NAME removes every staging directory
whose lock it can take, and leaves alone one whose writer still holds it. (A PID in the name would not do:
containers sharing a disk and a host name do not see each other's processes.) A `.NAME.old-XXXX`, a replaced
export moved aside, is never removed for the user: it may be the only copy of their previous export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there no staging directory is ever taken for abandoned
    fcntl = None

# A directory this young may be one that its writer has made but not yet locked.
MIN_AGE_S = 10.0


def make_staging_dir(output: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))


@contextmanager
def held(directory: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (it stays on the directory when it is renamed into place): a staging
    directory while its export writes, a run directory while its run lasts. With `wait` False a lock someone
    else holds raises BlockingIOError at once."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename directory `source` to `target`, raising FileExistsError when anything is at `target`, with no gap
    for one to appear in between: a check followed by a plain rename would replace a target made meanwhile (rename
    replaces an empty directory, and the caller's check may be minutes old). The target is claimed with mkdir,
    which fails if anything is there, and the rename then replaces that empty claim."""
    os.mkdir(target)
    try:
        os.rename(source, target)
    except BaseException:
        try:
            os.rmdir(target)
        except OSError:  # someone wrote into the claim meanwhile: theirs now
            pass
        raise


def clear_abandoned(output: Path) -> list[str]:
    """Remove the staging directories of writers of `output` that are gone; return a note for each one removed
    and for each moved-aside copy found."""
    if not output.parent.is_dir():
        return []
    notes = []
    for path in sorted(p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")):
        rest = path.name[len(output.name) + 2:]
        if rest.startswith("tmp-") and path.is_dir() and not path.is_symlink() and _abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"note: removed {path}, left by an export of {output} that was killed before it finished")
        elif rest.startswith("old-"):
            notes.append(f"note: {path} is a previous {output}, moved aside by a --force export that was killed or "
                         "could not delete it; keep or delete it yourself")
    return notes


def _abandoned(path: Path) -> bool:
    if fcntl is None or time.time() - path.stat().st_mtime < MIN_AGE_S:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its writer is still at work
    finally:
        os.close(fd)
    return True
