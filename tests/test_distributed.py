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
from helpers import REPO, TIMEOUT
from test_reliability import assert_same_adapter, wait_for_checkpoint

from qlora_trainer import distributed
from qlora_trainer.errors import UserError
from qlora_trainer.files.run_dir import latest_checkpoint

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


def start(launcher: list[str], recipe_file: Path, run: Path, *extra: str) -> subprocess.Popen:
    """A new session, so that a test can send Ctrl-C to all the processes at once as a terminal would."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([*launcher, "--recipe", str(recipe_file), "--output-dir", str(run), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})


def torchrun(recipe_file: Path, run: Path, *extra: str) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
                "-m", "qlora_trainer"]
    return start(launcher, recipe_file, run, *extra)


def finished(launch, recipe_file: Path, run: Path) -> tuple[Path, str]:
    proc = launch(recipe_file, run)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-4000:]
    return run, out


@pytest.fixture(scope="module")
def ddp_run(recipe_file, tmp_path_factory) -> tuple[Path, str]:
    return finished(torchrun, recipe_file, tmp_path_factory.mktemp("ddp") / "run")


@pytest.mark.slow
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


@pytest.mark.slow
def test_dpo_on_two_processes_trains_one_adapter_and_scores_every_held_out_pair(tiny_model_dir, tmp_path):
    """DPO under DDP: both processes end with the same adapter, and the held-out preference check, each process
    scoring its share, counts every pair once."""
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"""\
model: {{name_or_path: {tiny_model_dir}}}
lora: {{r: 8, alpha: 16, dropout: 0.0}}
data:
  path: {DEMO_DATA / "complaints-pref-train.jsonl"}
  eval_path: {DEMO_DATA / "complaints-pref-heldout.jsonl"}
  max_rows: 256
train: {{method: dpo, seq_len: 64, micro_batch_size: 4, gradient_accumulation_steps: 1, max_steps: 8,
        learning_rate: 2.0e-3, logging_steps: 2, save_steps: 100}}
eval: {{max_samples: 30}}
""")
    run, out = finished(torchrun, recipe, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["method"], summary["processes"], summary["strategy"]) == ("dpo", PROCESSES, "ddp")
    checksums = summary["adapter_sha256_per_process"]
    assert len(checksums) == PROCESSES and len(set(checksums)) == 1, checksums
    assert summary["preference_before"]["pairs"] == summary["preference_after"]["pairs"] == 30
    assert summary["preference_after"]["logp_margin"] > summary["preference_before"]["logp_margin"], summary
    assert out.count("Held-out preference after training") == 1, "printed once, by the main process"


def test_only_the_main_process_writes_and_prints(ddp_run):
    run, out = ddp_run
    assert out.count("qlora-trainer: recipe") == 1 and out.count("Done in") == 1
    assert "2 processes, DDP" in out
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "base_fingerprint.json", "checkpoints", "estimate.json", "loss.png", "metrics.jsonl", "recipe.yaml",
        "summary.json"]
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


@pytest.mark.slow
def test_ctrl_c_then_resume_on_two_processes_gives_the_uninterrupted_adapter(recipe_file, ddp_run, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(recipe_file, run)
    wait_for_checkpoint(run, 4, proc, timeout=TIMEOUT)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process receives it
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert not (run / "summary.json").exists(), "an interrupted run never looks complete"
    ours = [line for line in err.splitlines() if line.startswith("qlora-trainer: error:")]
    assert len(ours) == 1 and "stopped by SIGINT" in ours[0] and "--resume" in ours[0], err[-3000:]
    assert "qlora_trainer/" not in err, "no traceback from our code (torchrun prints its own on Ctrl-C)"
    saved = latest_checkpoint(run)
    assert saved is not None and int(saved.name.split("-")[1]) > 4, "both processes stopped at one step and saved it"
    assert {p.name for p in saved.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    resumed = torchrun(recipe_file, run, "--resume")
    out, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-4000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS
    assert_same_adapter(ddp_run[0], run)


# ---------------------------------------------------------------- FSDP-QLoRA, two gloo processes

FSDP_ON_CPU = REPO / "tests" / "fsdp_on_cpu"


def accelerate_fsdp(recipe_file: Path, run: Path, *extra: str) -> subprocess.Popen:
    """`accelerate launch` with the shipped FSDP-QLoRA config (minus its accelerator-only options), through the
    shim that lets accelerate use FSDP with gloo processes (see tests/fsdp_on_cpu/launch.py)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_ON_CPU / "accelerate.yaml"),
                str(FSDP_ON_CPU / "launch.py")]
    return start(launcher, recipe_file, run, "--set", "train.optimizer=adamw_torch", *extra)


@pytest.fixture(scope="module")
def fsdp_run(recipe_file, tmp_path_factory) -> tuple[Path, str]:
    return finished(accelerate_fsdp, recipe_file, tmp_path_factory.mktemp("fsdp") / "run")


def test_the_fsdp_config_differs_from_the_shipped_one_only_where_a_cpu_needs_it():
    import yaml

    shipped = yaml.safe_load((REPO / "recipes" / "accelerate" / "fsdp-qlora.yaml").read_text())
    ours = yaml.safe_load((FSDP_ON_CPU / "accelerate.yaml").read_text())
    changed = {k for k in shipped["fsdp_config"] if shipped["fsdp_config"][k] != ours["fsdp_config"][k]}
    assert changed == {"fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states"}
    assert {k: v for k, v in shipped.items() if k != "fsdp_config"} == {k: v for k, v in ours.items() if k != "fsdp_config"}


@pytest.mark.slow
def test_fsdp_trains_a_sharded_adapter_and_saves_it_whole(fsdp_run, ddp_run, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run, out = fsdp_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["processes"] == PROCESSES
    assert summary["final_loss"] < 0.7 * summary["first_loss"]
    assert "2 processes, FSDP" in out and "skipped under FSDP" in out
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == load_file(str(ddp_run[0] / "adapter" / "adapter_model.safetensors")).keys()
    assert summary["adapter_dtype"] == "float32" and all(t.dtype == torch.float32 for t in saved.values())
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k), "lora_B starts at zero: it trained"
    # PEFT loads it under its own key names: a key it did not recognise would leave lora_B at zero.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = dict(PeftModel.from_pretrained(base, run / "adapter").named_parameters())
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], tensor, rtol=0, atol=0, msg=key)


def test_fsdp_checkpoints_are_sharded_per_process(fsdp_run):
    run, _ = fsdp_run
    checkpoint = run / "checkpoints" / "checkpoint-4"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"pytorch_model_fsdp_0", "optimizer_0", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= names
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == PROCESSES


@pytest.mark.slow
def test_fsdp_checkpoints_hold_the_adapter_and_a_resumed_run_continues_from_it(recipe_file, fsdp_run, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    proc = accelerate_fsdp(recipe_file, run)
    wait_for_checkpoint(run, 4, proc, timeout=TIMEOUT)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and not (run / "summary.json").exists(), err[-3000:]
    saved = latest_checkpoint(run)
    # accelerate's sharded checkpoint of a PEFT model holds no adapter weights; ours are written beside it.
    weights = load_file(str(saved / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)
    resumed = accelerate_fsdp(recipe_file, run, "--resume")
    _, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    at = int(saved.name.split("-")[1])
    before = [r["loss"] for r in rows if r["step"] <= at][-1]
    after = [r["loss"] for r in rows if r["step"] > at]
    # Restarting from fresh adapters would put the loss back near its first value (6.4 here).
    assert after[0] < rows[0]["loss"] - 1.0 and after[-1] < before, rows
    # The optimizer moments come back too (accelerate alone would leave them at zero: max difference 0.011).
    straight, resumed_adapter = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (fsdp_run[0], run))
    for key, tensor in straight.items():
        torch.testing.assert_close(resumed_adapter[key], tensor, rtol=0, atol=1e-3, msg=key)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_multi_gpu_recipe_started_on_one_process_says_how_to_launch_it():
    from helpers import run_cli

    result = run_cli("--recipe", "llama2-70b-fsdp-2x24gb", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "written for fsdp on 2 GPUs with CPU offload: accelerate launch --config_file" in result.stdout
    assert "fsdp-qlora-offload.yaml --num_processes 2 -m qlora_trainer --recipe llama2-70b-fsdp-2x24gb" in result.stdout
    assert "per GPU of 2 under FSDP with CPU offload)\n" in result.stdout, \
        "a dry run estimates the launch the recipe is written for, as `estimate` does"
    # Started for real in one process, the estimate follows the actual launch: one process, the whole model (and
    # here, without a GPU, the run stops after the plan).
    result = run_cli("--recipe", "llama2-70b-fsdp-2x24gb")
    assert result.returncode == 3, result.stderr
    assert "Memory estimate for llama-2-70b (peak GPU memory, as nvidia-smi shows it)\n" in result.stdout


def test_launch_checks_global_batch_and_fsdp_optimizer():
    from qlora_trainer.config.recipe_files import load_recipe
    from qlora_trainer.training.train import check_launch

    recipe, _ = load_recipe("llama7b-r8", ["train.micro_batch_size=2", "train.global_batch_size=6"])
    check_launch(recipe, 2, distributed.Launch())
    with pytest.raises(UserError, match=r"global_batch_size \(6\) must be a multiple of .*2 x 2.*multiple of 4"):
        check_launch(recipe, 2, distributed.Launch(world_size=2, strategy="ddp"))
    recipe, _ = load_recipe("llama7b-r8", ["train.micro_batch_size=2", "train.global_batch_size=8"])
    check_launch(recipe, 2, distributed.Launch(world_size=2, strategy="ddp"))
    with pytest.raises(UserError, match=r"train.optimizer paged_adamw_8bit: under FSDP .*adamw_torch"):
        check_launch(recipe, 2, distributed.Launch(world_size=2, strategy="fsdp"))
