"""Whether a name the user gave is a path on this machine or a hub id: what exists here, or what is written as a
path (`./`, `/`, `~`), is local; anything else is looked up on the hub."""

from __future__ import annotations

from pathlib import Path


def looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).expanduser().exists()
