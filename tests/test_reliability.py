"""Interrupted runs resume exactly, failures keep the last good checkpoint and never write summary.json."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TIMEOUT, fail_at_step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from qlora_trainer.config.recipe import DataSection
from qlora_trainer.config.recipe_files import load_recipe
from qlora_trainer.dataset.data import load_data
from qlora_trainer.errors import TrainingFailed, UserError
from qlora_trainer.files.run_dir import latest_checkpoint
from qlora_trainer.training.train import RunOptions, train

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


def wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
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
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return run


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype == torch.bfloat16, key
        torch.testing.assert_close(first[key].float(), second[key].float(), rtol=0, atol=1e-3, msg=key)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(recipe_file, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = start(recipe_file, run)
    wait_for_checkpoint(run, 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "a killed run never looks complete"
    resumed = start(recipe_file, run, "--resume")
    out, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)), "steps replayed after the resume are logged once"
    assert_same_adapter(uninterrupted, run)


@pytest.mark.slow
def test_sigint_saves_prints_the_resume_command_and_resumes_exactly(recipe_file, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = start(recipe_file, run)
    wait_for_checkpoint(run, 8, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and str(run) in err and "Traceback" not in err
    assert not (run / "summary.json").exists()
    saved = latest_checkpoint(run)
    assert saved is not None and int(saved.name.split("-")[1]) > 8, "a checkpoint is saved at the interrupted step"
    resumed = start(recipe_file, run, "--resume")
    _, err = resumed.communicate(timeout=TIMEOUT)
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


@pytest.mark.parametrize("error, fragments", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     ["CUDA out of memory at step 3", "estimate was", "try "]),
    (OSError(errno.ENOSPC, "No space left on device"),
     ["No space left on device", "earlier checkpoints", "--resume"]),
])
def test_failures_mid_run_become_one_line_and_keep_checkpoints(recipe_file, tmp_path, monkeypatch, error, fragments):
    fail_at_step(monkeypatch, 3, error)
    recipe, _ = load_recipe(str(recipe_file), ["train.save_steps=2"])
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed) as info:
        train(recipe, RunOptions(recipe_name="fail", output_dir=run))
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert latest_checkpoint(run) == run / "checkpoints" / "checkpoint-2"
    assert not (run / "summary.json").exists()


def test_an_os_error_that_is_not_the_disk_is_not_reported_as_one(recipe_file, tmp_path, monkeypatch):
    """A connection reset mid-run is no full disk: it leaves train() as itself (for the command line's boundary,
    which saves its traceback as an internal error), not as "cannot write in RUN; free space"."""
    fail_at_step(monkeypatch, 3, ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"))
    recipe, _ = load_recipe(str(recipe_file), ["train.save_steps=2"])
    run = tmp_path / "run"
    with pytest.raises(ConnectionResetError):
        train(recipe, RunOptions(recipe_name="fail", output_dir=run))
    assert latest_checkpoint(run) == run / "checkpoints" / "checkpoint-2", "a run that stepped keeps its checkpoints"


@pytest.mark.parametrize("where", ["run", "elsewhere"])
def test_a_refused_write_names_the_disk_it_was_refused_on(recipe_file, tmp_path, monkeypatch, where):
    """Any error on a path in the run is the run's disk; a full disk elsewhere (a cache, /tmp) is named itself."""
    run = tmp_path / "run"
    path = run / "checkpoints" / "gone" if where == "run" else tmp_path / "cache" / "blob"
    code = errno.ENOENT if where == "run" else errno.ENOSPC
    fail_at_step(monkeypatch, 3, OSError(code, os.strerror(code), str(path)))
    recipe, _ = load_recipe(str(recipe_file), ["train.save_steps=2"])
    with pytest.raises(TrainingFailed) as info:
        train(recipe, RunOptions(recipe_name="fail", output_dir=run))
    expected = f"cannot write in {run} (" if where == "run" else f"cannot write {path} (No space left on device)"
    assert str(info.value).startswith(expected) and "earlier checkpoints" in str(info.value), str(info.value)


ROW_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                       st.lists(st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                                                st.one_of(st.text(max_size=6), st.integers()), max_size=3), max_size=3))
ROWS = st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "text", "messages", "instruction", "output",
                                                 "input", "conversations", "extra"]), ROW_VALUES, max_size=4),
                min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS, garbage=st.booleans())
def test_random_jsonl_rows_are_accepted_or_refused_cleanly(tmp_path, rows, garbage):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(row) for row in rows] + (["{not json"] if garbage else [])
    path.write_text("\n".join(lines) + "\n")
    section = DataSection(path=str(path))
    try:
        data = load_data(section, seed=0)
    except UserError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        assert len(data.train) >= 1 and not garbage


def test_resume_refuses_a_different_lora(recipe_file, uninterrupted, tmp_path, capsys):
    import shutil

    from qlora_trainer.cli import main

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    (run / "summary.json").unlink()
    code = main(["--recipe", str(recipe_file), "--output-dir", str(run), "--resume", "--set", "lora.r=4"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume: lora.r is 4 but the run used 8" in err and "Traceback" not in err


def test_a_full_disk_after_training_keeps_checkpoints_and_writes_no_summary(recipe_file, tmp_path, monkeypatch):
    import qlora_trainer.training.train as train_module

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_module, "plot_loss", full_disk)
    recipe, _ = load_recipe(str(recipe_file), ["train.max_steps=8"])
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed, match="training finished but saving its results in .*No space left on device.*--resume"):
        train(recipe, RunOptions(recipe_name="disk", output_dir=run))
    assert latest_checkpoint(run) == run / "checkpoints" / "checkpoint-8"
    assert not (run / "summary.json").exists()
