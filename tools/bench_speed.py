"""Training speed of our auto settings against our pinned micro-batch 1, the plain TRL + PEFT recipe and Unsloth,
on the same random-weight full-size model, the same rows and the same memory cap.

    python tools/bench_speed.py --cap 24                 # on a GPU: llama-7b shape, r=8 all-linear, seq_len 2048
    python tools/bench_speed.py --cap 0                  # uncapped
    python tools/bench_speed.py --device cpu             # a tiny smoke version of every path (the tests run it)

Each run is its own process, so no run inherits another's allocator cache or compiled kernels. Reported per
run: tokens/s (the median over optimizer steps after the first), peak memory as nvidia-smi shows it (NVML's
per-process figure, sampled while the run trains), MFU (6 x parameters x tokens/s over the GPU's dense bf16
peak), and the ratios between runs. Results go to benchmarks/speed/<gpu>-<cap>-<date>.json.
Unsloth runs where it can be imported: install it into its own directory (pip install --target DIR unsloth)
and pass that with --unsloth-path, since it pins its own transformers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from measure_vram import build_weights, synthetic_rows  # noqa: E402  (the same random weights and rows)

from qlora_trainer.estimate.memory import GIB  # noqa: E402 - after the path that finds the package

# Dense bf16 peak per GPU, TFLOP/s, for MFU (the vendors' data sheets, without sparsity).
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "RTX 4090": 165, "RTX 3090": 71, "A6000": 155}
# The CPU smoke version: the llama-7b layout at toy size.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 320}
UNSLOTH_MICRO_BATCHES = (1, 2, 4, 8)
RUNS = ("ours-auto", "ours-mb1", "trl-peft", "unsloth")
# Path flags, refused when blank or unusable as the command line's are: argparse dest -> flag.
PATH_FLAGS = {"workdir": "--workdir", "out": "--out", "unsloth_path": "--unsloth-path"}


# ---------------------------------------------------------------- the runs, each in its own process


def run_ours(args, weights: Path, rows: Path, work: Path, pinned: bool) -> dict:
    """The product itself: `python -m qlora_trainer --recipe llama7b-r8` on local weights and rows."""
    sets = {"model.name_or_path": weights, "data.path": rows, "data.format": "text", "data.eval_fraction": 0,
            "train.max_steps": args.steps, "train.logging_steps": 1, "train.save_steps": 10**6,
            "train.seq_len": args.seq_len, "train.global_batch_size": args.global_batch, "train.device": args.device,
            # Every row is exactly seq_len tokens, so packing would change nothing but the row count.
            "train.packing": False}
    if pinned:
        sets.update({"train.micro_batch_size": 1, "train.gradient_checkpointing": True})
    cmd = [sys.executable, "-m", "qlora_trainer", "--recipe", "llama7b-r8", "--output-dir", str(work / "run")]
    cmd += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    if args.cap:
        cmd += ["--gpu-memory", str(args.cap)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args))
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    rows_logged = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((work / "run" / "summary.json").read_text())
    speeds = [r["tokens_per_s"] for r in rows_logged if r.get("tokens_per_s") and r["step"] > 1]
    return {"tokens_per_s": statistics.median(speeds) if speeds else None, "levers": summary["levers"],
            "summary_peak_memory_gib": summary["peak_memory_gib"]}


def child_trl_peft(args, weights: str, rows: str, out: str) -> None:
    """The plain TRL + PEFT recipe, as the libraries' docs write it."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    _cap(args)
    on_gpu = args.device == "cuda"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(weights, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if on_gpu else "cpu"})
    model = prepare_model_for_kbit_training(model)
    config = SFTConfig(output_dir=str(Path(out).parent / "trl"), per_device_train_batch_size=1,
                       gradient_accumulation_steps=args.global_batch, max_steps=args.steps, learning_rate=2e-4,
                       optim="paged_adamw_8bit" if on_gpu else "adamw_bnb_8bit", gradient_checkpointing=True,
                       bf16=True, max_length=args.seq_len, logging_steps=1, save_strategy="no", report_to=[],
                       use_cpu=not on_gpu)
    trainer = SFTTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=rows)["train"],
                         processing_class=AutoTokenizer.from_pretrained(weights),
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    _train_and_write(trainer, out)


def child_unsloth(args, weights: str, rows: str, out: str) -> None:
    """Unsloth's FastLanguageModel path with its defaults, at one micro-batch."""
    import unsloth  # noqa: F401  (first, as Unsloth asks, so that its patches apply)
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    _cap(args)
    model, tokenizer = FastLanguageModel.from_pretrained(weights, max_seq_length=args.seq_len, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = SFTConfig(output_dir=str(Path(out).parent / "unsloth"), per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=args.global_batch // args.micro_batch, max_steps=args.steps,
                       learning_rate=2e-4, optim="adamw_8bit", max_length=args.seq_len, logging_steps=1,
                       save_strategy="no", report_to=[], bf16=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=load_dataset("json", data_files=rows)["train"],
                         processing_class=tokenizer)
    _train_and_write(trainer, out)


def _cap(args) -> None:
    """The same cap as ours: the process, context included, within --cap GiB."""
    if args.device == "cuda" and args.cap:
        from qlora_trainer.estimate.gpu_budget import apply_cap

        apply_cap(args.cap)


def _train_and_write(trainer, out: str) -> None:
    """Train, and write the median tokens/s over optimizer steps after the first (TRL logs num_tokens)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.marks.append((time.perf_counter(), float(logs["num_tokens"])))

    times = StepTimes()
    trainer.add_callback(times)
    trainer.train()
    speeds = [(t2 - t1) and (n2 - n1) / (t2 - t1) for (t1, n1), (t2, n2) in zip(times.marks, times.marks[1:])]
    Path(out).write_text(json.dumps({"tokens_per_s": statistics.median(speeds) if speeds else None}))


def run_child(args, kind: str, weights: Path, rows: Path, work: Path, micro_batch: int = 1) -> dict:
    out = work / f"{kind}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--weights", str(weights), "--rows", str(rows), "--out",
           str(out), "--device", args.device, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--global-batch", str(args.global_batch), "--cap", str(args.cap), "--micro-batch", str(micro_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(args, unsloth=kind == "unsloth"))
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(out.read_text())


def _env(args, unsloth: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        ([args.unsloth_path] if unsloth and args.unsloth_path else []) + [str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env


# ---------------------------------------------------------------- measuring, from outside the run


class NvmlPeak:
    """Samples the per-process GPU memory NVML reports (what nvidia-smi shows) for every process started while
    it runs, and keeps the largest figure. The training processes are children of this one."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        import pynvml

        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._mine = set()
        self._thread.start()
        return self

    def _sample(self) -> None:
        import pynvml

        while not self._stop.wait(self.interval_s):
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid != os.getpid() and proc.usedGpuMemory:
                    self.peak = max(self.peak, proc.usedGpuMemory)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / GIB, 3)


def measured(args, name: str, run) -> dict:
    started = time.perf_counter()
    if args.device == "cuda":
        with NvmlPeak() as peak:
            result = run()
        result["peak_gib_nvidia_smi"] = peak.gib
    else:
        result = run()
    result.update(run=name, wall_s=round(time.perf_counter() - started, 1))
    if result.get("tokens_per_s") and args.device == "cuda":
        result["mfu"] = round(result["tokens_per_s"] * 6 * args.params / (args.peak_tflops * 1e12), 4)
    print(describe(result), flush=True)
    return result


def describe(result: dict) -> str:
    """One line per run: `ours-auto      3,405 tokens/s   9.50 GiB  MFU 12.3%  (41 s)`."""
    if "skipped" in result:
        return f"{result['run']:<14} skipped: {result['skipped']}"
    parts = [f"{result['run']:<14} {result.get('tokens_per_s') or 0:>9,.0f} tokens/s"]
    if result.get("peak_gib_nvidia_smi") is not None:
        parts.append(f"{result['peak_gib_nvidia_smi']:6.2f} GiB")
    if result.get("mfu") is not None:
        parts.append(f"MFU {result['mfu']:.1%}")
    return "  ".join(parts) + f"  ({result['wall_s']:.0f} s)"


def ratios(results: list[dict]) -> dict:
    """Our auto choice against each other run: speed, and memory where measured."""
    by_name = {r["run"]: r for r in results if r.get("tokens_per_s")}
    ours = by_name.get("ours-auto")
    if ours is None:
        return {}
    unsloth = [r for name, r in by_name.items() if name.startswith("unsloth")]
    others = {name: r for name, r in by_name.items() if name != "ours-auto" and not name.startswith("unsloth")}
    if unsloth:
        others["unsloth-best"] = max(unsloth, key=lambda r: r["tokens_per_s"])
    found = {}
    for name, other in others.items():
        found[f"speed_vs_{name}"] = round(ours["tokens_per_s"] / other["tokens_per_s"], 3)
        if ours.get("peak_gib_nvidia_smi") and other.get("peak_gib_nvidia_smi"):
            found[f"memory_vs_{name}"] = round(ours["peak_gib_nvidia_smi"] / other["peak_gib_nvidia_smi"], 3)
    return found


def main() -> int:
    from qlora_trainer.cli import boundary, flag_values, path_arg

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--arch", default="llama-2-7b", help="architecture file for the random weights")
    parser.add_argument("--cap", type=float, default=0, help="GiB each run may use (0: uncapped)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, the same for every run")
    parser.add_argument("--runs", default="ours-auto,ours-mb1,trl-peft,unsloth")
    parser.add_argument("--unsloth-path", help="a pip --target directory holding Unsloth and its pins")
    parser.add_argument("--workdir", type=path_arg, default=Path(tempfile.gettempdir()) / "qlora-bench")
    parser.add_argument("--out", type=path_arg, help="result JSON (default: benchmarks/speed/<gpu>-<cap>-<date>.json on a "
                        "GPU; WORKDIR/speed-cpu.json for the CPU smoke run, which the repository does not keep)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="on an error, also print the full traceback")
    args = parser.parse_args()
    return boundary(lambda: run(args), args.debug, sys.argv[1:], flag_values(args, PATH_FLAGS), prog="bench_speed")


def run(args) -> int:
    from qlora_trainer.cli import check_path_flags
    from qlora_trainer.errors import UserError
    from qlora_trainer.loading.architectures import check_known

    if args.child:
        {"trl-peft": child_trl_peft, "unsloth": child_unsloth}[args.child](args, args.weights, args.rows, str(args.out))
        return 0
    check_path_flags(args, PATH_FLAGS)
    check_known(args.arch, "--arch")
    unknown = [name for name in args.runs.split(",") if name not in RUNS]
    if unknown:
        raise UserError(f"--runs {args.runs}: unknown run {unknown[0]!r}; the runs are {', '.join(RUNS)} (comma-separated)")
    bench(args)
    return 0


def bench(args) -> None:
    import torch

    from qlora_trainer.estimate.shape_lookup import shape_for_model

    if args.device == "cuda" and not torch.cuda.is_available():
        from qlora_trainer.errors import WontFitError

        raise WontFitError("no CUDA GPU here; pass --device cpu for the smoke version")
    overrides = TINY if args.device == "cpu" else {}
    if args.device == "cpu":
        args.seq_len, args.steps, args.global_batch = min(args.seq_len, 64), min(args.steps, 3), min(args.global_batch, 4)
    weights = build_weights(args.arch, args.workdir / "weights", overrides)
    rows = synthetic_rows(args.workdir / f"rows-{args.seq_len}.jsonl", args.seq_len, args.steps * args.global_batch + 8)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.params = shape_for_model(str(weights)).total_params
    args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None) or float("nan")
    results = []
    for name in args.runs.split(","):
        work = Path(tempfile.mkdtemp(dir=args.workdir, prefix=f"{name}-"))
        if name in ("ours-auto", "ours-mb1"):
            results.append(measured(args, name, lambda: run_ours(args, weights, rows, work, pinned=name == "ours-mb1")))
        elif name == "trl-peft":
            results.append(measured(args, name, lambda: run_child(args, "trl-peft", weights, rows, work)))
        elif name == "unsloth":
            results += unsloth_runs(args, weights, rows, work)
    report = {"gpu": gpu, "cap_gib": args.cap or None, "arch": args.arch, "seq_len": args.seq_len,
              "global_batch": args.global_batch, "steps": args.steps, "params": args.params,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "runs": results,
              # A smoke run's timings on a shared CPU measure nothing but the code path: no ratios from them.
              "ratios": ratios(results) if args.device == "cuda" else {},
              "note": None if args.device == "cuda" else "CPU smoke run: the code paths work; its timings are not a result"}
    out = args.out or (REPO / "benchmarks" / "speed" / (
        f"{gpu.replace(' ', '-').lower()}-{f'{args.cap:g}gib' if args.cap else 'uncapped'}-{report['date']}.json")
        if args.device == "cuda" else args.workdir / "speed-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{name.replace('_', ' ')} {value:.2f}x" for name, value in report["ratios"].items())
    print(f"wrote {out}" + (f"; ours-auto: {summary}" if summary else f" ({report['note']})" if report["note"] else ""))


def unsloth_runs(args, weights: Path, rows: Path, work: Path) -> list[dict]:
    """Unsloth at each micro-batch that divides the global batch; the fastest that fits the cap is its figure."""
    probe = subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True, env=_env(args, unsloth=True))
    if probe.returncode != 0:
        skipped = {"run": "unsloth", "skipped": "unsloth cannot be imported here"}
        print(describe(skipped), flush=True)
        return [skipped]
    runs = []
    for micro in (m for m in UNSLOTH_MICRO_BATCHES if args.global_batch % m == 0):
        args.micro_batch = micro
        runs.append(measured(args, f"unsloth-mb{micro}",
                             lambda: run_child(args, "unsloth", weights, rows, work, micro_batch=micro)))
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
