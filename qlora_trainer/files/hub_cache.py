"""Whether a hub repository is already on this machine, asked without the network: a dry run reads what is
here and says what it could not read instead of downloading it."""

from __future__ import annotations

from pathlib import Path


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """`repo_type` is "model" or "dataset"; True when huggingface_hub's cache holds a snapshot of it."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    return any((folder / "snapshots").glob("*"))
