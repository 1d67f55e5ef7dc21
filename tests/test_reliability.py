"""Interrupted runs resume exactly, failures keep the last good checkpoint and never write summary.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO
from qlora_trainer.errors import TrainingFailed
from qlora_trainer.recipe import load_recipe
from qlora_trainer.run_dir import latest_checkpoint
from qlora_trainer.train import RunOptions, train

DEMO_TRAIN = REPO / "recipes" / "data" / "complaints-train.jsonl"
STEPS = 24


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "resume.yaml"
    path.write_text(f"""\
model:
  name_or_path: {tiny_model_dir}
lora:
  r: 8
  alpha: 16
  dropout: 0.1          # dropout draws random numbers: resuming must restore the RNG too
data:
  path: {DEMO_TRAIN}
  max_rows: 600
train:
  seq_len: 64
  micro_batch_size: 8
  gradient_accumulation_steps: 2
  max_steps: {STEPS}
  learning_rate: 2.0e-3
  logging_steps: 4
  save_steps: 8
  save_total_limit: 5
""")
    return path


def start(recipe_file: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_trainer", "--recipe", str(recipe_file), "--output-dir", str(run), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint-{step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint-{step} after {timeout}s")


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(recipe_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = start(recipe_file, run)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return run


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype == torch.bfloat16, key
        torch.testing.assert_close(first[key].float(), second[key].float(), rtol=0, atol=1e-3, msg=key)


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(recipe_file, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = start(recipe_file, run)
    wait_for_checkpoint(run, 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "a killed run never looks complete"
    resumed = start(recipe_file, run, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    assert_same_adapter(uninterrupted, run)


def test_sigint_saves_prints_the_resume_command_and_resumes_exactly(recipe_file, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = start(recipe_file, run)
    wait_for_checkpoint(run, 8, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and str(run) in err and "Traceback" not in err
    assert not (run / "summary.json").exists()
    saved = latest_checkpoint(run)
    assert saved is not None and int(saved.name.split("-")[1]) > 8, "a checkpoint is saved at the interrupted step"
    resumed = start(recipe_file, run, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_adapter(uninterrupted, run)


def test_an_incomplete_checkpoint_is_skipped(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-8").mkdir(parents=True)
    (checkpoints / "checkpoint-8" / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-16").mkdir()  # a save that died before its state was written
    (checkpoints / ".partial" / "checkpoint-24").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == checkpoints / "checkpoint-8"


def test_checkpoints_are_renamed_into_place_whole(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-16", "checkpoint-24", "checkpoint-8"]
    assert not (uninterrupted / "checkpoints" / ".partial").exists()
    for name in names:
        assert (uninterrupted / "checkpoints" / name / "adapter_model.safetensors").is_file()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(recipe_file, tmp_path):
    recipe, _ = load_recipe(str(recipe_file), ["train.learning_rate=1e30", "train.save_steps=1", "train.max_steps=12"])
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed, match=r"non-finite .* step \d+.*learning_rate"):
        train(recipe, RunOptions(recipe_name="nan", output_dir=run))
    assert not (run / "summary.json").exists()
    last = latest_checkpoint(run)
    if last is not None:  # every kept checkpoint holds finite weights
        weights = load_file(str(last / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values())
