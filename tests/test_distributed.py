"""Two processes over gloo on the CPU (torchrun, as `accelerate launch` would start them on GPUs): DDP trains one
adapter in both, only the main process writes the run directory, and an interrupted two-process run resumes to
the uninterrupted run's adapter."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import REPO
from qlora_trainer import distributed
from qlora_trainer.errors import UserError
from qlora_trainer.run_dir import latest_checkpoint
from test_reliability import assert_same_adapter, wait_for_checkpoint

DEMO_DATA = REPO / "recipes" / "data"
STEPS, ROWS, MICRO, ACCUMULATION, PROCESSES = 12, 600, 8, 2, 2


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "ddp.yaml"
    path.write_text(f"""\
model:
  name_or_path: {tiny_model_dir}
lora:
  r: 8
  alpha: 16
  dropout: 0.1          # dropout draws random numbers in each process: resuming must restore every process's RNG
data:
  path: {DEMO_DATA / "complaints-train.jsonl"}
  eval_path: {DEMO_DATA / "complaints-heldout.jsonl"}
  max_rows: {ROWS}
train:
  seq_len: 64
  micro_batch_size: {MICRO}
  gradient_accumulation_steps: {ACCUMULATION}
  max_steps: {STEPS}
  learning_rate: 3.0e-3
  logging_steps: 2
  eval_steps: 6
  save_steps: 4
  save_total_limit: 5
eval:
  exact_match: true
  max_samples: 40
  max_new_tokens: 4
""")
    return path


def torchrun(recipe_file: Path, run: Path, *extra: str) -> subprocess.Popen:
    """Two processes on this machine; a new session so that a test can send Ctrl-C to all of them at once."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               "-m", "qlora_trainer", "--recipe", str(recipe_file), "--output-dir", str(run), *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


@pytest.fixture(scope="module")
def ddp_run(recipe_file, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(recipe_file, run)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return run, out


def test_both_processes_train_the_same_adapter_and_the_loss_falls(ddp_run):
    run, _ = ddp_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == PROCESSES and summary["strategy"] == "ddp"
    checksums = summary["adapter_sha256_per_process"]
    assert len(checksums) == PROCESSES and len(set(checksums)) == 1, checksums
    assert summary["final_loss"] < 0.7 * summary["first_loss"]
    assert summary["eval_loss"] < summary["first_loss"]
    # Each process reads its own share of the rows: an epoch is ceil(rows / (micro x processes)) micro-batches.
    steps_per_epoch = math.ceil(ROWS / (MICRO * PROCESSES)) // ACCUMULATION
    assert summary["epochs"] == pytest.approx(STEPS / steps_per_epoch, abs=1e-3)
    # Tokens are counted over both processes.
    assert summary["tokens_per_s"] == pytest.approx(PROCESSES * summary["tokens_per_s_per_process"], rel=1e-2)
    assert len(summary["peak_memory_gib_per_process"]) == PROCESSES


def test_only_the_main_process_writes_and_prints(ddp_run):
    run, out = ddp_run
    assert out.count("qlora-trainer: recipe") == 1 and out.count("Done in") == 1
    assert "2 processes, DDP" in out
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "checkpoints", "estimate.json", "loss.png", "metrics.jsonl", "recipe.yaml", "summary.json"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)), "each step is logged once, by one process"
    checkpoint = run / "checkpoints" / f"checkpoint-{STEPS}"
    # The main process writes the checkpoint; each process adds only its own random-number state.
    assert {p.name for p in checkpoint.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (run / "checkpoints" / ".partial").exists()


def test_exact_match_is_shared_between_the_processes(ddp_run):
    _, out = ddp_run
    line = next(l for l in out.splitlines() if l.startswith("Held-out exact match after training"))
    assert line.endswith("/40)"), line  # 20 prompts completed by each process, counted together


def test_ctrl_c_then_resume_on_two_processes_gives_the_uninterrupted_adapter(recipe_file, ddp_run, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(recipe_file, run)
    wait_for_checkpoint(run, 4, proc, timeout=600)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process receives it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not (run / "summary.json").exists(), "an interrupted run never looks complete"
    ours = [line for line in err.splitlines() if line.startswith("qlora-trainer: error:")]
    assert len(ours) == 1 and "stopped by SIGINT" in ours[0] and "--resume" in ours[0], err[-3000:]
    assert "qlora_trainer/" not in err, "no traceback from our code (torchrun prints its own on Ctrl-C)"
    saved = latest_checkpoint(run)
    assert saved is not None and int(saved.name.split("-")[1]) > 4, "both processes stopped at one step and saved it"
    assert {p.name for p in saved.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    resumed = torchrun(recipe_file, run, "--resume")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-4000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    assert_same_adapter(ddp_run[0], run)


# ---------------------------------------------------------------- the agreement helpers, in two real processes


def _worker(rank: int, world: int, port: int, scratch: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    launch = distributed.current_launch()
    marker = Path(scratch) / "written-by.txt"
    outcome = {}

    def write() -> str:
        with marker.open("a") as handle:
            handle.write(f"{rank}\n")
        return f"from {rank}"

    outcome["on_main"] = distributed.on_main(write, launch)
    try:
        with distributed.together(launch):
            if rank == 1:
                raise UserError("data.path: row 3 has no completion")
    except UserError as err:
        outcome["together"] = (str(err), getattr(err, "agreed", False))
    outcome["any"] = distributed.any_process(rank == 1, torch.device("cpu"))
    results[rank] = outcome
    dist.destroy_process_group()


def test_agreement_helpers_in_two_gloo_processes(tmp_path, unused_port):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, unused_port, str(tmp_path), results), nprocs=2, join=True)
    assert (tmp_path / "written-by.txt").read_text() == "0\n", "on_main runs its function in the main process only"
    for rank in (0, 1):
        assert results[rank]["on_main"] == "from 0", "and hands the result to every process"
        message, agreed = results[rank]["together"]
        assert message == "process 1: data.path: row 3 has no completion" and agreed, \
            "an error in one process ends every process with it"
        assert results[rank]["any"] is True


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
