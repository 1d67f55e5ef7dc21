"""Measure real peak GPU memory of QLoRA training next to the estimator's prediction.

Builds a random-weight model at full size from a known architecture (no download), saves it once in bf16,
loads it in 4-bit through the trainer's own code path, runs a few optimizer steps with SFTTrainer on
full-length synthetic sequences (the estimator's worst case), and appends one JSON line per configuration:

    python tools/measure_vram.py --arch llama-2-7b --rank 8 --seq-len 2048 --batch-size 1
    python tools/measure_vram.py --grid                      # the issue's 16-configuration grid, one process each

Each configuration runs in a fresh process so that one run's cached allocator blocks never inflate the next.
`--device cpu` runs the same path on the CPU (no memory figures), which the test suite uses to keep this
script working on machines without a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GRID = {"arch": ["llama-2-7b", "llama-3.1-8b", "qwen2.5-7b"], "rank": [8, 64], "seq_len": [512, 2048],
        "batch_size": [1, 4], "checkpointing": [True, False]}
GIB = 2**30


def grid_configs() -> list[dict]:
    """16 configurations: every architecture at the recipe default, then one change at a time, then two together."""
    base = {"arch": "llama-2-7b", "rank": 8, "seq_len": 2048, "batch_size": 1, "checkpointing": True}
    configs = [dict(base, arch=a) for a in GRID["arch"]]
    for arch, key in itertools.product(GRID["arch"], ("rank", "seq_len", "batch_size", "checkpointing")):
        other = [v for v in GRID[key] if v != base[key]][0]
        configs.append(dict(base, arch=arch, **{key: other}))
    configs.append(dict(base, rank=64, batch_size=4, seq_len=512))
    return configs


def build_weights(arch: str, root: Path, overrides: dict) -> Path:
    """Save a random-weight bf16 model and a byte-level tokenizer for `arch` once; reuse it afterwards."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from qlora_trainer.architectures import load_architecture

    target = root / (arch + ("-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) if overrides else ""))
    if (target / "config.json").is_file():
        return target
    config = load_architecture(arch)
    config.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    # One token per byte: any text becomes exactly as many tokens as it has bytes, so lengths are exact.
    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(target)
    return target


def synthetic_rows(path: Path, seq_len: int, count: int) -> Path:
    """Text rows longer than seq_len, so truncation makes every sequence exactly seq_len tokens."""
    rng = random.Random(0)
    letters = string.ascii_lowercase + " "
    rows = ["".join(rng.choice(letters) for _ in range(seq_len + 16)) for _ in range(count)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    return path


def measure(cfg: dict, device: str, steps: int, workdir: Path, overrides: dict) -> dict:
    import torch

    from qlora_trainer import model as model_lib
    from qlora_trainer.data import load_data
    from qlora_trainer.memory import estimate
    from qlora_trainer.memory_report import settings_from_recipe, shape_for_model
    from qlora_trainer.recipe import validate
    from qlora_trainer.train import build_trainer

    weights = build_weights(cfg["arch"], workdir / "weights", overrides)
    data_path = synthetic_rows(workdir / f"rows-{cfg['seq_len']}.jsonl", cfg["seq_len"], steps * cfg["batch_size"] + 8)
    recipe = validate({
        "model": {"name_or_path": str(weights)},
        "lora": {"r": cfg["rank"], "alpha": 2 * cfg["rank"]},
        "data": {"path": str(data_path), "format": "text"},
        "train": {"seq_len": cfg["seq_len"], "micro_batch_size": cfg["batch_size"], "gradient_accumulation_steps": 1,
                  "max_steps": steps, "gradient_checkpointing": cfg["checkpointing"], "save_steps": 10**6,
                  "logging_steps": 1,
                  # The configuration exactly as given: no lever switches itself on.
                  "activation_offloading": False, "kernels": "none", "packing": False, "padding_free": False},
    }, source="measure_vram")
    predicted = estimate(shape_for_model(str(weights)), settings_from_recipe(recipe))
    context = 0
    if device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # create the context before reading it
        free, total = torch.cuda.mem_get_info()
        context = total - free - torch.cuda.memory_reserved()
    base = model_lib.load_base_model(recipe.model, recipe.quantization, device)
    trainer = build_trainer(recipe, base, model_lib.load_tokenizer(recipe.model), load_data(recipe.data, 0),
                            workdir / "run", device)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result = {**cfg, "device": device, "steps": steps, "seconds": round(seconds, 2),
              "predicted_gib": round(predicted.total / GIB, 3),
              "predicted_breakdown_gib": {k: round(v / GIB, 4) for k, v in predicted.breakdown.items()},
              "final_loss": trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None}
    if device == "cuda":
        reserved = torch.cuda.max_memory_reserved()
        result.update(peak_reserved_gib=round(reserved / GIB, 3), peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                      cuda_context_gib=round(context / GIB, 3), measured_gib=round((reserved + context) / GIB, 3),
                      nvidia_smi_gib=_nvidia_smi_gib(), gpu=torch.cuda.get_device_name())
        result["error_percent"] = round(100 * (result["predicted_gib"] - result["measured_gib"]) / result["measured_gib"], 2)
    return result


def _nvidia_smi_gib() -> float | None:
    """This process's memory as nvidia-smi reports it (MiB), or None where nvidia-smi is missing."""
    import os

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        pid, used = (part.strip() for part in line.split(","))
        if pid == str(os.getpid()):
            return round(int(used) / 1024, 3)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama-2-7b")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--config-override", default="{}", help="JSON of config changes, e.g. to shrink a model for a CPU smoke run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-vram"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "vram" / "results.jsonl")
    parser.add_argument("--grid", action="store_true", help="run the grid, each configuration in a fresh process")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.grid:
        for cfg in grid_configs():
            cmd = [sys.executable, __file__, "--arch", cfg["arch"], "--rank", str(cfg["rank"]), "--seq-len", str(cfg["seq_len"]),
                   "--batch-size", str(cfg["batch_size"]), "--steps", str(args.steps), "--device", args.device,
                   "--workdir", str(args.workdir), "--out", str(args.out)] + ([] if cfg["checkpointing"] else ["--no-checkpointing"])
            print("running", cfg, flush=True)
            subprocess.run(cmd, check=False)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("measure_vram: no CUDA GPU here; pass --device cpu for a smoke run of the code path")
    cfg = {"arch": args.arch, "rank": args.rank, "seq_len": args.seq_len, "batch_size": args.batch_size,
           "checkpointing": not args.no_checkpointing}
    result = measure(cfg, args.device, args.steps, args.workdir, json.loads(args.config_override))
    with args.out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
