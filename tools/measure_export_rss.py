"""Measure the peak resident memory of `export` on a mid-size random model, next to the model's size.

Builds a random-weight model from a known architecture (default Qwen2.5-0.5B: 494M parameters, ~1 GB in bf16),
attaches a random rank-16 LoRA adapter on every linear layer, and runs the export command in a fresh process
with and without verification, reading the peak RSS from the kernel (`ru_maxrss` of the child):

    python tools/measure_export_rss.py                       # writes benchmarks/export/rss.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))


def random_adapter(base_dir: Path, target: Path, rank: int) -> None:
    """A LoRA adapter with random (non-zero) weights on every linear layer, saved with the base's tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(target)
    for path in base_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, target / path.name)


def run_export(adapter: Path, base: Path, output: Path, verify: bool, shard: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "qlora_trainer", "export", str(adapter), "--base", str(base), "--output", str(output),
           "--max-shard-size", shard]
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(cmd + ([] if verify else ["--no-verify"]), capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise SystemExit("this run did not raise the children's peak RSS; run each measurement in a fresh process")
    report = json.loads((output / "export.json").read_text())
    return {"verify": verify, "max_shard_size": shard, "peak_rss_gib": round(peak_kib / 2**20, 3), "seconds": round(time.perf_counter() - started, 1),
            "output_gib": round(sum(p.stat().st_size for p in output.glob("*.safetensors")) / 2**30, 3),
            "verification": report if verify else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-export-rss"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "export" / "rss.json")
    parser.add_argument("--verify", action="store_true", help="measure the export with verification instead")
    parser.add_argument("--max-shard-size", default="2GB")
    args = parser.parse_args()
    from measure_vram import build_weights

    base = build_weights(args.arch, args.workdir / "weights", {})
    adapter = args.workdir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        random_adapter(base, adapter, args.rank)
    params = json.loads((base / "config.json").read_text())
    imports = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c",
                              "import qlora_trainer.deploy.export, qlora_trainer.cli, torch, transformers, peft, bitsandbytes"],
                             capture_output=True, text=True, cwd=REPO)
    result = {"arch": args.arch, "python_and_libraries_rss_gib": round(int(imports.stderr.strip().splitlines()[-1]) / 2**20, 3), "rank": args.rank, "machine": "CPU (2 cores, 24 GiB), torch 2.13 CPU",
              "base_bf16_gib": round(sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**30, 3),
              "vocab_size": params["vocab_size"], **run_export(adapter, base, args.workdir / "merged", args.verify, args.max_shard_size)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else []
    same = lambda r: (r.get("verify"), r.get("max_shard_size")) == (result["verify"], result["max_shard_size"])
    args.out.write_text(json.dumps([r for r in previous if not same(r)] + [result], indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
