"""train.report_to: transformers' own tracker integrations, written locally here (TensorBoard event files in the
run, trackio's local database), and a missing tracker package refused before anything loads."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import refused_cleanly, run_cli, tiny_recipe

from qlora_trainer.config.recipe import TrainSection
from qlora_trainer.training import trackers


@pytest.mark.slow
def test_tensorboard_and_trackio_get_the_logged_steps(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir,
                         train={"max_steps": 3, "save_steps": 3, "report_to": ["tensorboard", "trackio"]})
    run = tmp_path / "run"
    result = run_cli("--recipe", str(recipe), "--output-dir", str(run), env={"TRACKIO_DIR": str(tmp_path / "trackio")})
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3] and all(e.value > 0 for e in losses)
    assert not list((run / "checkpoints").rglob("events.out.tfevents.*")), "TensorBoard writes to the run, not the checkpoints"
    databases = list((tmp_path / "trackio").rglob("*.db"))
    assert databases, "trackio wrote no local database"
    with sqlite3.connect(databases[0]) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        counts = {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}
    assert any(count >= 3 for count in counts.values()), counts  # a row per logged step


def test_a_missing_tracker_package_is_one_line_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.PACKAGES, "mlflow", ("qlora_no_such_module", "mlflow"))
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, train={"report_to": ["mlflow"]})
    refused_cleanly(["--recipe", str(recipe), "--output-dir", str(tmp_path / "run")], 2,
                    "train.report_to: mlflow needs the mlflow package: pip install mlflow", watch=[tmp_path])


def test_report_to_names_only_known_trackers():
    assert TrainSection().report_to == []
    with pytest.raises(ValueError, match="tensorboard"):
        TrainSection(report_to=["tensorbord"])
    assert trackers.report_to(["tensorboard", "wandb"]) == ["wandb"]  # TensorBoard is our own callback
