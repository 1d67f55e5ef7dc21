"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# One limit for every subprocess a test waits on: it turns a hang into a failure, and must not turn a loaded
# machine into one (a 2-core machine running another job took 3x the usual time); QLORA_TEST_TIMEOUT overrides.
TIMEOUT = float(os.environ.get("QLORA_TEST_TIMEOUT", 3600))
DEMO_TRAIN = REPO / "recipes" / "data" / "complaints-train.jsonl"


def tiny_recipe(path: Path, model_dir: Path, **sections: dict) -> Path:
    """Write a recipe that trains `model_dir` for four steps of eight demo rows, checkpointing every two, with
    `sections` merged over it key by key (`train={"max_steps": 6}`); return its path."""
    import yaml

    recipe = {"model": {"name_or_path": str(model_dir)},
              "lora": {"r": 4, "alpha": 8},
              "data": {"path": str(DEMO_TRAIN), "max_rows": 32, "format": "prompt_completion"},
              "train": {"seq_len": 64, "micro_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": 4,
                        "save_steps": 2, "logging_steps": 1}}
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def resolved_on_cpu(recipe, data=None):
    """`recipe` resolved as a CPU run resolves it (planned without a GPU budget; packing and the data format from
    `data`, the rows as loaded, when given): what build_trainer and the stages after planning take."""
    from qlora_trainer.estimate import auto_settings
    from qlora_trainer.estimate.shape_lookup import shape_for_model

    shape = shape_for_model(recipe.model.name_or_path, recipe.model.trust_remote_code)
    chosen = auto_settings.plan(recipe, shape, auto_settings.Budget(None, "test: the CPU"), on_gpu=False)
    if data is None:
        return auto_settings.resolve(recipe, chosen)[0]
    return auto_settings.resolve(recipe, chosen, data.recipe_format, data.stats.get("train_mean_tokens"))[0]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m qlora_trainer ARGS` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "qlora_trainer", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=TIMEOUT)


def tree_state(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its mode and content hash (or None for a directory, "missing" for an absent
    root): comparing two snapshots proves that a refused command created, changed and removed nothing."""
    import hashlib

    state: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            state[str(root)] = ("missing",)
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_dir():
                state[str(path)] = (path.stat().st_mode, None)
            else:
                state[str(path)] = (path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def refused_cleanly(argv: list[str], code: int, fragment: str, watch: list[Path] = ()) -> str:
    """Run the command line in this process and check the promise for bad input: exit `code`, exactly one
    `qlora-trainer: error:` line that contains `fragment`, no traceback anywhere, and nothing under `watch`
    created, changed or removed. Returns the error line."""
    import contextlib
    import io

    from qlora_trainer.cli import main

    before = tree_state(*watch)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        got = main(list(argv))
    stderr = err.getvalue()
    lines = [line for line in stderr.splitlines() if line.startswith("qlora-trainer: error:")]
    assert got == code, (got, stderr[-2000:], out.getvalue()[-1000:])
    assert "Traceback" not in stderr + out.getvalue(), stderr[-3000:]
    assert len(lines) == 1, stderr[-2000:]
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert tree_state(*watch) == before, "a refused command changed files it was given"
    return lines[0]


def fail_at_step(monkeypatch, step: int, error: Exception) -> None:
    """Make the next run raise `error` at the end of optimizer step `step`, after the checkpoints before it: a
    stand-in for failures the CPU cannot produce on demand (CUDA out of memory, a full disk)."""
    from transformers import TrainerCallback

    import qlora_trainer.training.train as train_module

    class RaiseAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise error

    original = train_module.build_trainer
    monkeypatch.setattr(train_module, "build_trainer", lambda *a, callbacks=(), **k: original(
        *a, callbacks=(*callbacks, RaiseAtStep()), **k))


def hub_cache_model(cache: Path, repo_id: str, revisions: dict[str, dict[str, bytes]]) -> dict[str, Path]:
    """Lay out a model in huggingface_hub's cache format under `cache` (what HF_HUB_CACHE points at): one snapshot
    per revision name, with `refs/NAME` naming its commit, as a download leaves them. Returns each snapshot's
    directory. Tests point the hub at `cache` offline, so a revision is found only through its ref."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = {}
    for name, files in revisions.items():
        commit = hashlib.sha1(name.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file, content in files.items():
            (snapshot / file).write_bytes(content)
        snapshots[name] = snapshot
    return snapshots
