"""Measure real peak GPU memory of QLoRA training next to the estimator's prediction.

Builds a random-weight model at full size from a known architecture (no download), saves it once in bf16,
loads it in 4-bit through the trainer's own code path, runs a few optimizer steps with SFTTrainer on
full-length synthetic sequences (the estimator's worst case), and appends one JSON line per configuration:

    python tools/measure_vram.py --arch llama-2-7b --rank 8 --seq-len 2048 --batch-size 1
    python tools/measure_vram.py --arch gemma-2-2b --attn eager --offload --kernels liger
    python tools/measure_vram.py --grid --jobs 3             # the grid, three configurations at a time

Each configuration runs in a fresh process with its own run directory, so that one run's cached allocator blocks
never inflate the next and concurrent jobs never touch each other's checkpoints. The measured figure is the
process's own peak as nvidia-smi shows it, from NVML's per-process reading (qlora_trainer/training/gpu_memory.py), which
stays right when other jobs share the GPU; torch's peak reserved and allocated are recorded beside it.
`--device cpu` runs the same path on the CPU (no memory figures), which the test suite uses to keep this script
working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qlora_trainer.estimate.memory import GIB  # noqa: E402 - after the path that finds the package

GRID = {"arch": ["llama-2-7b", "llama-3.1-8b", "qwen2.5-7b"], "rank": [8, 64], "seq_len": [512, 2048],
        "batch_size": [1, 4], "checkpointing": [True, False]}
# The levers the speed work may choose, each on llama-2-7b at micro-batch 4 (where they matter), other ranks,
# lengths and micro-batches than the grid's, and Gemma-2, whose soft-capped attention needs eager attention.
LEVERS = [{"offload": True}, {"kernels": "liger"}, {"offload": True, "kernels": "liger"}, {"packing": True},
          {"lora_dropout": 0.0}, {"rank": 16, "batch_size": 2, "seq_len": 1024}]
DEFAULTS = {"attn": "sdpa", "offload": False, "kernels": "none", "packing": False, "lora_dropout": 0.05, "cap": None}


def grid_configs() -> list[dict]:
    """Every architecture at the recipe default, then one change at a time, two together, the levers, Gemma-2."""
    base = {"arch": "llama-2-7b", "rank": 8, "seq_len": 2048, "batch_size": 1, "checkpointing": True}
    configs = [dict(base, arch=a) for a in GRID["arch"]]
    for arch, key in itertools.product(GRID["arch"], ("rank", "seq_len", "batch_size", "checkpointing")):
        other = [v for v in GRID[key] if v != base[key]][0]
        configs.append(dict(base, arch=arch, **{key: other}))
    configs.append(dict(base, rank=64, batch_size=4, seq_len=512))
    configs += [dict(base, **{"batch_size": 4, **lever}) for lever in LEVERS]
    configs.append(dict(base, arch="gemma-2-2b", attn="eager", seq_len=1024))
    return [dict(DEFAULTS, **c) for c in configs]


def build_weights(arch: str, root: Path, overrides: dict) -> Path:
    """Save a random-weight bf16 model and a byte-level tokenizer for `arch` once; reuse it afterwards."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from qlora_trainer.loading.architectures import load_architecture

    target = root / (arch + ("-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else ""))
    if (target / "config.json").is_file():
        return target
    config = load_architecture(arch)
    config.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = target.with_name(f".{target.name}.{os.getpid()}")  # renamed into place whole: no half-built model
    model.save_pretrained(partial)
    # One token per byte: any text becomes exactly as many tokens as it has bytes, so lengths are exact.
    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another job built it first
        shutil.rmtree(partial)
    return target


def synthetic_rows(path: Path, seq_len: int, count: int) -> Path:
    """Text rows longer than seq_len, so truncation makes every sequence exactly seq_len tokens."""
    rng = random.Random(0)
    letters = string.ascii_lowercase + " "
    rows = ["".join(rng.choice(letters) for _ in range(seq_len + 16)) for _ in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe_for(cfg: dict, weights: Path, data_path: Path, steps: int) -> dict:
    """The run's recipe, with every lever this version's recipe schema has set explicitly, so no `auto` picks."""
    from qlora_trainer.config.recipe import TrainSection

    train = {"seq_len": cfg["seq_len"], "micro_batch_size": cfg["batch_size"], "gradient_accumulation_steps": 1,
             "max_steps": steps, "gradient_checkpointing": cfg["checkpointing"], "save_steps": 10**6, "logging_steps": 1,
             "packing": cfg["packing"], "padding_free": cfg["packing"]}
    levers = {"activation_offloading": cfg["offload"], "kernels": cfg["kernels"], "gpu_memory_gib": cfg["cap"]}
    for key, value in levers.items():
        if key in TrainSection.model_fields or value not in (False, "none", None):
            train[key] = value  # a lever asked of a version without it fails validation, naming the key
    return {"model": {"name_or_path": str(weights), "attn_implementation": cfg["attn"]},
            "lora": {"r": cfg["rank"], "alpha": 2 * cfg["rank"], "dropout": cfg["lora_dropout"]},
            "data": {"path": str(data_path), "format": "text"}, "train": train}


def measure(cfg: dict, device: str, steps: int, workdir: Path, overrides: dict) -> dict:
    from qlora_trainer.config.recipe_files import validate
    from qlora_trainer.config.resolved_recipe import concrete
    from qlora_trainer.dataset.data import load_data
    from qlora_trainer.estimate.memory import estimate
    from qlora_trainer.estimate.recipe_settings import settings_from_recipe
    from qlora_trainer.estimate.shape_lookup import shape_for_model
    from qlora_trainer.loading import model as model_lib
    from qlora_trainer.training.trainer_setup import build_trainer

    weights = build_weights(cfg["arch"], workdir / "weights", overrides)
    run = workdir / f"run-{os.getpid()}"  # concurrent jobs: each its own checkpoints and staging directory
    data_path = synthetic_rows(run / "rows.jsonl", cfg["seq_len"], steps * cfg["batch_size"] + 8)
    # Every lever is set, so the recipe is concrete as it stands: resolving only checks that.
    recipe = concrete(validate(recipe_for(cfg, weights, data_path, steps), source="measure_vram"))
    settings = dataclasses.replace(settings_from_recipe(recipe), activation_offloading=cfg["offload"],
                                   kernels=cfg["kernels"], packing=cfg["packing"], padding_free=cfg["packing"])
    predicted = estimate(shape_for_model(str(weights)), settings)
    sampler = _start_sampler() if device == "cuda" else None
    base = model_lib.load_base_model(recipe.model, recipe.quantization, device)
    trainer = build_trainer(recipe, base, model_lib.load_tokenizer(recipe.model), load_data(recipe.data, 0), run, device)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result = {**cfg, "device": device, "steps": steps, "seconds": round(seconds, 2),
              "predicted_gib": round(predicted.total / GIB, 3),
              "predicted_allocator_gib": round((predicted.total - predicted.breakdown["cuda_context"]) / GIB, 3),
              "predicted_breakdown_gib": {k: round(v / GIB, 4) for k, v in predicted.breakdown.items()},
              "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None}
    if sampler is not None:
        result.update(_measured(sampler, predicted.total))
    shutil.rmtree(run, ignore_errors=True)
    return result


def _start_sampler():
    import torch

    from qlora_trainer.training.gpu_memory import MemorySampler, ProcessMemory

    torch.cuda.init()
    torch.empty(1, device="cuda")  # create the context so that the first sample sees it
    sampler = MemorySampler(ProcessMemory())
    sampler.start()
    return sampler


def _measured(sampler, predicted_bytes: int) -> dict:
    """The NVML peak (what nvidia-smi showed for this process), the allocator's peaks, and the error against NVML."""
    import torch

    sampler.stop()
    snap = sampler.snapshot()
    if snap["nvidia_smi"] is None:
        from qlora_trainer.errors import TrainingFailed

        raise TrainingFailed(f"no per-process figure from NVML: {sampler.process.reason}")
    error = 100 * (predicted_bytes / GIB - snap["nvidia_smi"]) / snap["nvidia_smi"]
    return {"nvidia_smi_gib": snap["nvidia_smi"], "torch_peak_reserved_gib": snap["peak_reserved"],
            "torch_peak_allocated_gib": snap["peak_allocated"], "non_allocator_gib": snap["non_allocator"],
            "nvml_samples": sampler.tracker.samples, "gpu": torch.cuda.get_device_name(), "error_percent": round(error, 2)}


def run_grid(args) -> None:
    """Each configuration in a fresh process, `--jobs` at a time; the weights are built first, once per model."""
    configs = grid_configs()
    for arch in sorted({c["arch"] for c in configs}):
        build_weights(arch, args.workdir / "weights", {})
    pending = [(cfg, _command(cfg, args)) for cfg in configs]
    running: list[tuple[dict, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            cfg, cmd = pending.pop(0)
            print("running", cfg, flush=True)
            running.append((cfg, subprocess.Popen(cmd)))
        time.sleep(1)
        for cfg, proc in [r for r in running if r[1].poll() is not None]:
            running.remove((cfg, proc))
            if proc.returncode:
                print(f"FAILED ({proc.returncode}):", cfg, flush=True)


def _command(cfg: dict, args) -> list[str]:
    cmd = [sys.executable, __file__, "--arch", cfg["arch"], "--rank", str(cfg["rank"]), "--seq-len", str(cfg["seq_len"]),
           "--batch-size", str(cfg["batch_size"]), "--steps", str(args.steps), "--device", args.device,
           "--workdir", str(args.workdir), "--out", str(args.out), "--attn", cfg["attn"], "--kernels", cfg["kernels"],
           "--lora-dropout", str(cfg["lora_dropout"])]
    flags = {"--no-checkpointing": not cfg["checkpointing"], "--offload": cfg["offload"], "--packing": cfg["packing"]}
    cmd += [flag for flag, on in flags.items() if on]
    return cmd + (["--cap", str(cfg["cap"])] if cfg["cap"] else [])


# Path flags, refused when blank or unusable as the command line's are: argparse dest -> flag.
PATH_FLAGS = {"workdir": "--workdir", "out": "--out"}


def config_override(text: str) -> dict:
    """--config-override: a JSON object of config.json changes."""
    from qlora_trainer.errors import UserError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--config-override is not JSON ({err.msg} at column {err.colno}); give an object such as "
                        "'{\"num_hidden_layers\": 2}'") from None
    if not isinstance(value, dict):
        raise UserError(f"--config-override holds a JSON {type(value).__name__}; give an object such as "
                        "'{\"num_hidden_layers\": 2}'")
    return value


def main() -> int:
    from qlora_trainer.cli import boundary, flag_values, path_arg

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--attn", default="sdpa", help="model.attn_implementation (Gemma-2 needs eager)")
    parser.add_argument("--offload", action="store_true", help="train.activation_offloading: true")
    parser.add_argument("--kernels", default="none", choices=["none", "liger"], help="train.kernels")
    parser.add_argument("--packing", action="store_true", help="train.packing and train.padding_free: true")
    parser.add_argument("--cap", type=float, default=None, metavar="GIB", help="train.gpu_memory_gib: cap the process at GIB")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--config-override", default="{}", help="JSON of config changes, e.g. to shrink a model for a CPU smoke run")
    parser.add_argument("--workdir", type=path_arg, default=Path("/tmp/qlora-vram"))
    parser.add_argument("--out", type=path_arg, help="JSON lines to append to (default: benchmarks/vram/results.jsonl "
                        "on a GPU; WORKDIR/results-cpu.jsonl for a CPU smoke run, which measures no memory)")
    parser.add_argument("--grid", action="store_true", help="run the grid, each configuration in a fresh process")
    parser.add_argument("--jobs", type=int, default=1, help="with --grid: configurations run at once on the GPU")
    parser.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")
    args = parser.parse_args()
    return boundary(lambda: run(args), args.debug, sys.argv[1:], flag_values(args, PATH_FLAGS), prog="measure_vram")


def run(args) -> int:
    from qlora_trainer.cli import check_path_flags
    from qlora_trainer.loading.architectures import check_known

    check_path_flags(args, PATH_FLAGS)
    check_known(args.arch, "--arch")
    overrides = config_override(args.config_override)
    if args.out is None:  # the repository keeps GPU measurements only
        args.out = REPO / "benchmarks" / "vram" / "results.jsonl" if args.device == "cuda" else \
            args.workdir / "results-cpu.jsonl"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid:
        run_grid(args)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from qlora_trainer.errors import WontFitError

            raise WontFitError("no CUDA GPU here; pass --device cpu for a smoke run of the code path")
    cfg = {"arch": args.arch, "rank": args.rank, "seq_len": args.seq_len, "batch_size": args.batch_size,
           "checkpointing": not args.no_checkpointing, "attn": args.attn, "offload": args.offload,
           "kernels": args.kernels, "packing": args.packing, "lora_dropout": args.lora_dropout, "cap": args.cap}
    result = measure(cfg, args.device, args.steps, args.workdir, overrides)
    with args.out.open("a", encoding="utf-8") as handle:  # one line per process, appended whole
        handle.write(json.dumps(result) + "\n")
    print(describe(result) + f"  (appended to {args.out})")
    return 0


def describe(result: dict) -> str:
    """One line a person reads: the configuration, the prediction and, on a GPU, the measurement."""
    what = (f"{result['arch']} r={result['rank']} seq {result['seq_len']} x {result['batch_size']}, checkpointing "
            f"{'on' if result['checkpointing'] else 'off'}, {result['attn']}")
    measured = (f", nvidia-smi {result['nvidia_smi_gib']:.2f} GiB ({result['error_percent']:+.1f}%)"
                if result.get("nvidia_smi_gib") is not None else "")
    return f"{what}: predicted {result['predicted_gib']:.2f} GiB{measured}, {result['seconds']:.0f} s"


if __name__ == "__main__":
    raise SystemExit(main())
