"""--resume with a damaged newest checkpoint: the damaged file is named and the run continues from the previous
complete checkpoint to the same result; with none left, one line says what to delete; and a resume that fails
before its checkpoint has loaded leaves the run directory exactly as it was."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import refused_cleanly, tiny_recipe
from safetensors.torch import load_file, save_file

from qlora_trainer.cli import main
from qlora_trainer.errors import UserError
from qlora_trainer.training.resume import damage, usable_checkpoint


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """Four steps with a checkpoint every two, on a private copy of the tiny model (one test damages it)."""
    root = tmp_path_factory.mktemp("resume")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    # Dropout draws random numbers: resuming must restore the RNG state too.
    recipe = tiny_recipe(root / "recipe.yaml", model, lora={"dropout": 0.1}, data={"max_rows": 64},
                         train={"save_total_limit": 5, "learning_rate": 2.0e-3})
    run = root / "run"
    code, _, err = run_main(["--recipe", str(recipe), "--output-dir", str(run)])
    assert code == 0, err[-3000:]
    return run


@pytest.fixture
def interrupted(finished, tmp_path) -> Path:
    """The finished run as a run killed after its last checkpoint: no summary, adapter or plot yet."""
    return killed_copy(finished, tmp_path / "run")


def killed_copy(finished: Path, run: Path, drop_checkpoints: tuple[str, ...] = ()) -> Path:
    """A copy of a finished run as the run killed after its newest remaining checkpoint left it."""
    shutil.copytree(finished, run)
    for name in ("summary.json", "loss.png"):
        (run / name).unlink()
    for name in ("adapter", *(f"checkpoints/{c}" for c in drop_checkpoints)):
        shutil.rmtree(run / name)
    return run


def assert_ended_as_uninterrupted(run: Path, finished: Path, retrained: range) -> None:
    """Every step logged once; the retrained steps' losses and the final adapter those of the run never stopped."""
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, retrained.stop)), "steps before the checkpoint kept, the rest logged once"
    for step in retrained:
        assert losses(run)[step] == pytest.approx(losses(finished)[step], abs=1e-3)
    straight = load_file(str(finished / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key].float(), straight[key].float(), rtol=0, atol=1e-3, msg=key)


def cut(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def resume_argv(run: Path) -> list[str]:
    return ["--recipe", str(run / "recipe.yaml"), "--output-dir", str(run), "--resume"]


def test_a_damaged_newest_checkpoint_falls_back_and_the_run_ends_as_if_uninterrupted(finished, interrupted):
    cut(interrupted / "checkpoints" / "checkpoint-4" / "optimizer.pt", 0.5)
    code, out, err = run_main(resume_argv(interrupted))
    assert code == 0, err[-3000:]
    said = [line for line in out.splitlines() if line.startswith("--resume:")]
    assert len(said) == 1 and "checkpoint-4/optimizer.pt" in said[0] and "checkpoint-2 instead" in said[0], out
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["steps"] == 4
    # Steps 3 and 4 were trained again from checkpoint-2's adapter, optimizer and RNG state: the same losses and
    # the same adapter as the run that was never interrupted.
    assert_ended_as_uninterrupted(interrupted, finished, range(3, 5))
    assert damage(interrupted / "checkpoints" / "checkpoint-4") is None, "the damaged checkpoint was saved again"


FILES = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors", "adapter_config.json",
         "trainer_state.json"]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.97])
def test_every_file_of_the_newest_checkpoint_is_read_back(interrupted, name, fraction, capsys):
    cut(interrupted / "checkpoints" / "checkpoint-4" / name, fraction)
    assert usable_checkpoint(interrupted) == interrupted / "checkpoints" / "checkpoint-2"
    out = capsys.readouterr().out
    assert f"checkpoint-4/{name}" in out and "checkpoint-2 instead" in out


def test_a_checkpoint_missing_its_adapter_is_passed_over(interrupted, capsys):
    (interrupted / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").unlink()
    assert usable_checkpoint(interrupted) == interrupted / "checkpoints" / "checkpoint-2"
    assert "adapter_model.safetensors (missing)" in capsys.readouterr().out


@pytest.mark.parametrize("newest, older", [("optimizer.pt", "adapter_model.safetensors"),
                                           ("trainer_state.json", "rng_state.pth"),
                                           ("adapter_config.json", "scheduler.pt")])
def test_with_no_usable_checkpoint_one_line_names_the_file_and_what_to_delete(interrupted, newest, older):
    cut(interrupted / "checkpoints" / "checkpoint-4" / newest, 0.5)
    cut(interrupted / "checkpoints" / "checkpoint-2" / older, 0.5)
    line = refused_cleanly(resume_argv(interrupted), 2, f"checkpoint-4/{newest}", watch=[interrupted])
    checkpoints = interrupted / "checkpoints"
    assert f"delete {checkpoints / 'checkpoint-4'} {checkpoints / 'checkpoint-2'}" in line and "step 0" in line


def test_a_resume_that_fails_before_its_checkpoint_loads_rewrites_nothing(interrupted, tmp_path):
    """The base model is damaged: the run fails while loading it, after planning and reading the data, and
    recipe.yaml, estimate.json and metrics.jsonl must still be what the interrupted run left."""
    model = tmp_path / "model"
    shutil.copytree(_model_of(interrupted), model)
    recipe = interrupted / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(_model_of(interrupted), str(model)))
    cut(model / "model.safetensors", 0.5)
    refused_cleanly(resume_argv(interrupted), 2, "model.safetensors is damaged", watch=[interrupted])


def test_a_checkpoint_the_trainer_cannot_load_is_named_and_nothing_rewritten(interrupted):
    """Every file reads back, but the adapter has another rank than the model: the Trainer's own load fails."""
    path = interrupted / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    narrower = {k: (t[:2] if "lora_A" in k else t[:, :2]).contiguous() for k, t in load_file(str(path)).items()}
    save_file(narrower, str(path), metadata={"format": "pt"})
    line = refused_cleanly(resume_argv(interrupted), 2, "checkpoint-4 will not load", watch=[interrupted])
    assert "delete" in line and "checkpoint before it" in line


def test_every_checkpoint_damaged_is_refused_by_the_function_too(interrupted):
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        cut(interrupted / "checkpoints" / checkpoint / "scheduler.pt", 0.0)
    with pytest.raises(UserError, match=r"checkpoint-4/scheduler.pt \(damaged or truncated"):
        usable_checkpoint(interrupted)


def _model_of(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())["model"]["name_or_path"]


def test_a_packed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """Packing with padding-free batches (the GPU default for short rows) changes what each step trains on; a run
    killed after a checkpoint must still resume to the adapter of the run that was never interrupted."""
    recipe = tiny_recipe(tmp_path / "packed.yaml", tiny_model_dir, lora={"dropout": 0.1}, data={"max_rows": 96},
                         train={"seq_len": 128, "micro_batch_size": 2, "packing": True, "padding_free": True,
                                "max_steps": 6, "save_steps": 3, "save_total_limit": 5, "learning_rate": 2.0e-3})
    finished = tmp_path / "straight"
    code, out, err = run_main(["--recipe", str(recipe), "--output-dir", str(finished)])
    assert code == 0, err[-3000:]
    summary = json.loads((finished / "summary.json").read_text())
    assert summary["levers"]["packing"] is True and summary["levers"]["padding_free"] is True
    run = killed_copy(finished, tmp_path / "killed", drop_checkpoints=("checkpoint-6",))
    code, out, err = run_main(resume_argv(run))
    assert code == 0, err[-3000:]
    assert "starting from step 0" not in out and "resuming from the previous" not in out, out
    assert_ended_as_uninterrupted(run, finished, range(4, 7))
