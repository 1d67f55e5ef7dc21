"""Training metrics: one JSON line per logged step in `metrics.jsonl`, and the loss plot `loss.png`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from qlora_trainer.training.gpu_memory import MemorySampler, ProcessMemory


def perplexity(token_loss: float) -> float:
    return math.exp(min(token_loss, 700.0))  # capped: exp overflows a float past ~709


class MetricsLogger(TrainerCallback):
    """Append step, loss, learning rate, tokens/s and peak GPU memory to metrics.jsonl at every log.

    On a GPU every process samples its own memory (`memory`, gpu_memory.py) from the start of training to its end;
    the main process writes the rows."""

    def __init__(self, path: Path, perplexity: bool = True):
        self.path = path
        self.perplexity = perplexity  # exp(eval loss) means something only where the loss is a token NLL (sft)
        self._last_time: float | None = None
        self._last_tokens = 0.0
        self.memory: MemorySampler | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = 0.0
        if args.device.type == "cuda":
            self.memory = self.memory or MemorySampler(ProcessMemory())
            self.memory.start()

    def on_train_end(self, args, state, control, **kwargs):
        if self.memory is not None:
            self.memory.stop()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return  # the final train summary goes to summary.json instead
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            row.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"))
            row.update(self._speed(logs))
        # Preference trainers log their rewards (chosen minus rejected: the margin) and reward accuracy.
        row.update({k: v for k, v in logs.items() if k.startswith(("eval_", "rewards/"))})
        # Perplexity of the eval tokens the loss counts (answers only by default).
        if logs.get("eval_loss") is not None and self.perplexity:
            row["eval_perplexity"] = perplexity(logs["eval_loss"])
        if self.memory is not None:
            self.memory.sample()
            peak = self.memory.snapshot()
            # What nvidia-smi showed at the peak so far (None where NVML cannot see this process), and the allocator's.
            row.update(peak_gpu_memory_gib=peak["nvidia_smi"], peak_reserved_gib=peak["peak_reserved"],
                       peak_allocated_gib=peak["peak_allocated"])
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def _speed(self, logs: dict) -> dict:
        """Non-padding tokens per second since the previous log (TRL logs the running token count)."""
        now, tokens = time.perf_counter(), float(logs.get("num_tokens", 0.0))
        # On resume TRL's count restarts from the checkpoint's; a drop means a new count, not negative speed.
        delta = tokens - self._last_tokens if tokens >= self._last_tokens else 0.0
        elapsed = now - (self._last_time or now)
        self._last_time, self._last_tokens = now, tokens
        return {"tokens": tokens, "tokens_per_s": round(delta / elapsed, 1) if elapsed > 0 and delta else None}


def read_metrics(path: Path) -> list[dict]:
    """The logged rows. A line torn by a kill mid-append can only be the last one: it is left out, as a resume
    leaves it out (resume.resumed_metrics), rather than failing the plot and the summary of a finished run."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except ValueError:
        pass
    return rows


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
