"""What fits a GPU: the longest sequence and largest micro-batch that fit (`estimate --fit`), the single changes
that would bring an estimate under a limit, and the stop before loading for a run that will not fit. "Fits" is
fit_rule's one rule."""

from __future__ import annotations

import dataclasses

from qlora_trainer.errors import WontFitError
from qlora_trainer.estimate import fit_rule
from qlora_trainer.estimate.memory import estimate
from qlora_trainer.estimate.types import GIB, Estimate, ModelShape, Settings


def fit(shape: ModelShape, settings: Settings, gpu_memory_gib: float, global_batch: int) -> dict:
    """The longest sequence (up to the requested one) and then the largest micro-batch that fit, with the
    accumulation that keeps the global batch."""
    limit = fit_rule.usable_gib(gpu_memory_gib) * GIB
    seq, shortest = settings.seq_len, min(128, settings.seq_len)
    while seq >= shortest and estimate(shape, dataclasses.replace(settings, seq_len=seq, batch_size=1)).total > limit:
        seq //= 2
    if seq < shortest:
        return {"fits": False, "reason": f"even seq_len {shortest} with micro-batch 1 does not fit"}
    batch = 1
    while batch * 2 <= global_batch and estimate(shape, dataclasses.replace(settings, seq_len=seq, batch_size=batch * 2)).total <= limit:
        batch *= 2
    best = estimate(shape, dataclasses.replace(settings, seq_len=seq, batch_size=batch))
    return {"fits": True, "seq_len": seq, "micro_batch_size": batch, "gradient_accumulation_steps": max(1, global_batch // batch),
            "global_batch_size": global_batch, "total_gib": round(best.total / GIB, 3)}


def fixes_that_fit(shape: ModelShape, settings: Settings, limit_gib: float) -> list[str]:
    """The two or three single changes that would bring the estimate under the limit."""
    candidates = [
        ("--set train.micro_batch_size=1", {"batch_size": 1}),
        ("fsdp_offload_params: true in the accelerate config", {"cpu_offload": settings.strategy == "fsdp"}),
        ("--set train.gradient_checkpointing=true", {"gradient_checkpointing": True}),
        (f"--set train.seq_len={settings.seq_len // 2}", {"seq_len": settings.seq_len // 2}),
        ("--set train.optimizer=paged_adamw_8bit", {"optimizer": "paged_adamw_8bit"}),
        (f"--set lora.r={max(1, settings.rank // 2)}", {"rank": max(1, settings.rank // 2)}),
    ]
    found = []
    for flag, change in candidates:
        changed = dataclasses.replace(settings, **change)
        if changed != settings and estimate(shape, changed).total / GIB <= limit_gib:
            found.append(f"{flag} ({estimate(shape, changed).total / GIB:.1f} GiB)")
    return found[:3]


def check_fits(est: Estimate, shape: ModelShape, budget_gib: float, budget_source: str, force: bool) -> None:
    """Stop before loading when the estimate exceeds the budget (nvidia-smi terms, the CUDA context included)."""
    if fit_rule.fits(est.total / GIB, budget_gib) or force:
        return
    fixes = fixes_that_fit(shape, est.settings, fit_rule.usable_gib(budget_gib))
    hint = "; try " + ", or ".join(fixes) if fixes else "; use a smaller model or a larger GPU"
    raise WontFitError(f"estimated peak {est.total / GIB:.1f} GiB exceeds {fit_rule.usable_gib(budget_gib):.1f} GiB, "
                       f"{1 - fit_rule.SAFETY_MARGIN:.0%} of the {budget_gib:.1f} GiB budget ({budget_source}){hint} "
                       "(or --force to try anyway)")
