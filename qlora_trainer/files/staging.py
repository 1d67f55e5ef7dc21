"""Directories written beside their destination and renamed into place when whole (an export), and what a writer
that was killed outright (SIGKILL, a power cut: no cleanup ran) leaves of them.

A staging directory is named `.NAME.tmp-HOST-PID-XXXX`, so the next writer of NAME can tell one whose writer is
gone (same host, no such process) from one still being written, and remove only the first. A `.NAME.old-XXXX`
(a replaced export moved aside) is never removed for the user: it may be the only copy of their previous export.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path


def make_staging_dir(output: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-{_host()}-{os.getpid()}-"))


def clear_abandoned(output: Path) -> list[str]:
    """Remove the staging directories of writers of `output` that died on this host; return a note for each one
    removed and for each moved-aside copy found."""
    notes = []
    if not output.parent.is_dir():
        return notes
    staging = re.compile(rf"\.{re.escape(output.name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")
    for path in sorted(output.parent.glob(f".{output.name}.*")):
        found = staging.fullmatch(path.name)
        if found and found["host"] == _host() and not _alive(int(found["pid"])) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"note: removed {path}, left by an export of {output} that was killed before it finished")
        elif path.name.startswith(f".{output.name}.old-"):
            notes.append(f"note: {path} is a previous {output} that a killed --force export moved aside; "
                         "keep or delete it yourself")
    return notes


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
