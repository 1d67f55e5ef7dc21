"""metrics.jsonl read back and the loss plot (training/metrics.py)."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest

from qlora_trainer.training.metrics import plot_loss, read_metrics

ROWS = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "eval_loss": 2.25}, {"step": 3, "loss": None},
        {"step": 4, "loss": 1.25}, {"step": 4, "eval_loss": 1.5}]


def test_rows_come_back_in_order_and_a_torn_last_line_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in ROWS[:3]) + "\n" + json.dumps(ROWS[3])[:9]
    path.write_text(text, encoding="utf-8")
    assert read_metrics(path) == ROWS[:3]


def test_a_damaged_line_before_the_last_is_not_hidden(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(ValueError):
        read_metrics(path)


def test_no_file_is_no_rows(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_the_plot_draws_the_train_and_eval_loss_of_the_rows(tmp_path, monkeypatch):
    drawn = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (drawn.append(fig), close(fig)))
    path = tmp_path / "loss.png"
    plot_loss(ROWS, path, "demo: tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # the temporary file was moved into place
    (ax,) = drawn[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"train loss": ([1, 2, 4], [2.5, 2.0, 1.25]), "eval loss": ([2, 4], [2.25, 1.5])}
    assert ax.get_title() == "demo: tiny" and ax.get_xlabel() == "optimizer step"


def test_rows_without_eval_plot_only_the_train_loss(tmp_path, monkeypatch):
    drawn = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (drawn.append(fig), close(fig)))
    plot_loss(ROWS[:1], tmp_path / "loss.png", "t")
    assert [line.get_label() for line in drawn[0].axes[0].get_lines()] == ["train loss"]
