"""summary.json: what a run measured (losses, tokens/s, peak memory beside the estimate, exact match, the settings
it ran with), and the lines printed when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qlora_trainer.estimate.auto_settings import Plan
from qlora_trainer.files.run_dir import SUMMARY
from qlora_trainer.loading import model as model_lib
from qlora_trainer.training.metrics import MetricsLogger
from qlora_trainer.training.run_state import PreparedRun, RunContext


@dataclass
class Outcome:
    """What a run measured, for summary.json: the same in every process but `memory` and `checksums`, gathered."""

    report: dict
    plan: Plan | None = None  # what the `auto` settings were settled to, and why
    before: dict | None = None
    after: dict | None = None
    preference_before: dict | None = None  # held-out preference accuracy and margins (preference_eval.py)
    preference_after: dict | None = None
    result: object = None
    runtime: float = 0.0
    memory: list[dict] = field(default_factory=list)  # each process's peak GPU memory
    checksums: list[str] | None = None  # each process's adapter (DDP)


def memory_sampler(trainer):
    """The GPU memory sampler the metrics callback ran during training (None on CPU)."""
    loggers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsLogger)]
    return loggers[0].memory if loggers else None


def summarise(prepared: PreparedRun, ctx: RunContext, trainer, outcome: Outcome, rows: list[dict]) -> dict:
    """Tokens are counted over all processes (TRL gathers them); memory and adapter checksums per process."""
    recipe, data, launch = prepared.recipe, prepared.data, ctx.launch
    runtime, memory = outcome.runtime, outcome.memory
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    final_eval = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})
    tokens = max((r.get("tokens") or 0 for r in rows), default=0)
    return {
        "recipe": ctx.options.recipe_name,
        "model": recipe.model.name_or_path,
        "device": "cuda" if memory[0]["measured"] is not None else "cpu",
        "processes": launch.world_size,
        "strategy": launch.strategy,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": outcome.result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": final_eval.get("eval_perplexity"),
        "runtime_s": round(runtime, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        "tokens_per_s_per_process": round(tokens / runtime / launch.world_size, 1) if runtime > 0 else None,
        **outcome.report,
        "data_format": data.format,
        "data_conversational": data.conversational,  # how generate formats a prompt (dataset/formats.py)
        "data": data.stats,
        # accelerate's FSDP mixed precision keeps trainable weights in fp32 (and autocasts the compute).
        "adapter_dtype": "float32" if launch.strategy == "fsdp" else recipe.lora.dtype,
        "frozen_dtypes": sorted(set(model_lib.frozen_dtypes(trainer.model).values())),
        "exact_match_before": outcome.before and outcome.before["accuracy"],
        "exact_match_after": outcome.after and outcome.after["accuracy"],
        "exact_match_examples": outcome.after and outcome.after["examples"],
        "method": recipe.train.method,
        "preference_before": outcome.preference_before,
        "preference_after": outcome.preference_after,
        "auto_settings": outcome.plan.to_json() if outcome.plan else None,
        "levers": {k: getattr(recipe.train, k) for k in ("micro_batch_size", "gradient_checkpointing",
                                                         "activation_offloading", "kernels", "compile", "packing",
                                                         "padding_free", "gpu_memory_gib")},
        "peak_memory_gib": memory[0],  # the main process's GPU
        "peak_memory_gib_per_process": memory,
        "adapter_sha256_per_process": outcome.checksums,
    }


def describe_summary(summary: dict, run: Path) -> str:
    lines = [f"Done in {summary['runtime_s']:.0f}s: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> "
             f"{summary['final_loss']:.3f}" if summary["first_loss"] is not None else f"Done: {summary['steps']} steps"]
    if summary["eval_loss"] is not None:
        lines.append(f"  eval loss {summary['eval_loss']:.3f}")
    if summary["exact_match_after"] is not None:
        lines.append(f"  held-out exact match {summary['exact_match_before']:.1%} -> {summary['exact_match_after']:.1%}")
    if summary.get("preference_after"):
        before, after = summary["preference_before"], summary["preference_after"]
        for key, label, form in (("accuracy", "accuracy", ".1%"), ("reward_margin", "reward margin", "+.3f"),
                                 ("logp_margin", "log-prob margin", "+.2f")):
            if after.get(key) is not None:
                lines.append(f"  held-out preference {label} {before[key]:{form}} -> {after[key]:{form}}")
    lines.append(f"  adapter   {run / 'adapter'}")
    lines.append(f"  metrics   {run / 'metrics.jsonl'}, plot {run / 'loss.png'}, summary {run / SUMMARY}")
    return "\n".join(lines)
