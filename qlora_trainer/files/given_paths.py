"""Paths we are handed, on a flag or in a recipe key, checked where they enter: an empty one (an unset shell
variable) would be read as the current directory, and one the operating system cannot use at all (a name longer
than the file system allows, a loop of symbolic links) would otherwise fail deep inside a library with a bare errno.
Also the one line for an OS error met later on such a path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from qlora_trainer.errors import UserError

# What to do about an OS error on a path we were given. ENOENT is not here: a missing input is checked where it
# enters, and a missing file later on is our bug.
PATH_ERRNOS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "it is on a read-only file system; choose another path",
    errno.EISDIR: "it is a directory where a file is expected",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows; choose a shorter path",
    errno.ELOOP: "it goes round a loop of symbolic links; fix the link or choose another path",
}
# Errors that make a path unusable whatever the command would do with it: refused where the path enters.
UNUSABLE = (errno.ENAMETOOLONG, errno.ELOOP)
EMPTY = "is empty (an unset shell variable?)"


def is_blank(text: object) -> bool:
    return isinstance(text, str) and not text.strip()


def unusable(path: str | Path) -> str | None:
    """Why no command could use `path` ('File name too long; choose a shorter path'), or None. A path that does not
    exist yet is usable: it may be one to create."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno in UNUSABLE:
            return f"{err.strerror}; {PATH_ERRNOS[err.errno]}"
    except ValueError:  # an embedded NUL byte
        return "contains a NUL character; choose another path"
    return None


def check_given(value: str | Path | None, name: str, what: str = "a path") -> None:
    """Refuse a flag's or key's path (`name`, e.g. --output-dir) that is blank or that the OS cannot use."""
    if value is None:
        return
    if is_blank(value):
        raise UserError(f"{name} {EMPTY}; give {what}")
    problem = unusable(value)
    if problem is not None:
        raise UserError(f"{name} {value}: {problem}")


def os_error_line(err: OSError, flags: dict[str, object]) -> str | None:
    """The one line for an OS error on a path we were given: the flag whose path it is on (from `flags`, the
    command line's flag -> value), the path and what to do; None for an OS error that is no such thing."""
    if not err.filename or err.errno not in PATH_ERRNOS:
        return None
    where = Path(os.fsdecode(err.filename))
    flag = next((name for name, value in flags.items() if _related(where, value)), None)
    if flag is None:
        named = f"{where}"
    elif _absolute(where) == _absolute(flags[flag]):
        named = f"{flag} {where}"
    else:  # a file inside the flag's directory, or a parent of its path
        named = f"{flag} {flags[flag]}: {where}"
    return f"{named}: {err.strerror}; {PATH_ERRNOS[err.errno]}"


def _related(path: Path, value: object) -> bool:
    """Whether an error on `path` is an error on the flag value `value`: the same path, inside it, or a parent of
    it. Compared as written: resolving links may fail on the very error being reported."""
    if not isinstance(value, (str, Path)) or is_blank(value):
        return False
    one, other = _absolute(path), _absolute(value)
    return one == other or other in one.parents or one in other.parents


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(path))
