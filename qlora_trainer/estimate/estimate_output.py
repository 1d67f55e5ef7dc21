"""How an estimate is shown: the breakdown printed for people, the `estimate --json` object for tools, and the
table of trainable shares by rank."""

from __future__ import annotations

from dataclasses import asdict

from qlora_trainer.estimate import fit_rule
from qlora_trainer.estimate.memory import CALIBRATED, estimate
from qlora_trainer.estimate.shape_lookup import shape_for_model
from qlora_trainer.estimate.types import GIB, Estimate, Settings

TABLE_RANKS = (1, 2, 4, 8, 16, 64, 256, 1024)
TABLE_MODELS = ("llama-2-7b", "mistral-7b", "llama-3.1-8b", "qwen2.5-7b", "llama-2-13b", "qwen2.5-14b", "llama-2-70b")


def format_estimate(est: Estimate, gpu_memory_gib: float | None = None) -> str:
    s = est.settings
    where = {"single": "", "ddp": f", per GPU of {s.num_gpus} under DDP",
             "fsdp": f", per GPU of {s.num_gpus} under FSDP{' with CPU offload' if s.cpu_offload else ''}"}[s.strategy]
    lines = [f"Memory estimate for {est.model} (peak GPU memory, as nvidia-smi shows it{where})"]
    for term, size in est.breakdown.items():
        lines.append(f"  {term:<20} {size / GIB:8.3f} GiB")
    lines.append(f"  {'total':<20} {est.total / GIB:8.3f} GiB")
    share = 100 * est.trainable_params / est.all_params
    lines.append(f"  trainable params {est.trainable_params:,} of {est.all_params:,} with the adapters ({share:.3f}%)")
    lines.append(f"  inputs: rank {s.rank} on {s.target_modules if isinstance(s.target_modules, str) else ','.join(s.target_modules)}, "
                 f"seq_len {s.seq_len}, micro-batch {s.batch_size}, {s.optimizer}, "
                 f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.attn_implementation} attention")
    if est.cpu_offload_bytes:
        lines.append(f"  offloaded to CPU RAM: {est.cpu_offload_bytes / GIB:.3f} GiB per process")
    if est.paged_bytes:
        lines.append(f"  plus {est.paged_bytes / GIB:.3f} GiB of paged optimizer state in CUDA managed memory (not in "
                     "nvidia-smi's per-process figure; spills to CPU RAM under pressure)")
    if est.activation_offload_bytes:
        lines.append(f"  activations offloaded to pinned CPU RAM: {est.activation_offload_bytes / GIB:.3f} GiB")
    if gpu_memory_gib is not None:
        lines.append(f"  on a {gpu_memory_gib:g} GiB GPU: {fit_rule.verdict(est.total / GIB, gpu_memory_gib)}")
    lines.extend(f"  note: {note}" for note in est.notes)
    return "\n".join(lines)


def estimate_json(est: Estimate, gpu_memory_gib: float | None = None) -> dict:
    """The `estimate --json` object (docs/design.md names its keys); with a budget, whether it fits."""
    result = {
        "model": est.model,
        "total_gib": round(est.total / GIB, 3),
        "breakdown_gib": {k: round(v / GIB, 4) for k, v in est.breakdown.items()},
        "breakdown_bytes": dict(est.breakdown),
        "trainable_params": est.trainable_params,
        "total_params": est.total_params,
        "all_params": est.all_params,
        "trainable_percent": round(100 * est.trainable_params / est.all_params, 4),
        # What a memory cap (torch.cuda.set_per_process_memory_fraction) limits is the allocator's share:
        # cap = budget - non_allocator_gib. Paged optimizer state and offloaded activations are in neither.
        "allocator_gib": round((est.total - est.breakdown["cuda_context"]) / GIB, 3),
        "non_allocator_gib": round(est.breakdown["cuda_context"] / GIB, 3),
        "paged_optimizer_gib": round(est.paged_bytes / GIB, 4),
        "activation_offload_cpu_gib": round(est.activation_offload_bytes / GIB, 4),
        "per_gpu": True,
        "gpus": est.settings.num_gpus,
        "strategy": est.settings.strategy,
        "cpu_offload_gib": round(est.cpu_offload_bytes / GIB, 4),
        "calibrated": CALIBRATED,
        "inputs": asdict(est.settings),
        "notes": est.notes,
    }
    if gpu_memory_gib is not None:
        result["gpu_memory_gib"] = gpu_memory_gib
        result["fits"] = fit_rule.fits(est.total / GIB, gpu_memory_gib)
        result["headroom_gib"] = round(fit_rule.headroom_gib(est.total / GIB, gpu_memory_gib), 3)
    return result


def rank_table(models: tuple[str, ...] = TABLE_MODELS, ranks: tuple[int, ...] = TABLE_RANKS) -> str:
    """Trainable share of parameters by LoRA rank (all linear layers), exact for each architecture."""
    shapes = [shape_for_model(m) for m in models]
    width = max(len(m) for m in models)
    lines = [f"{'rank':>6}  " + "  ".join(f"{m:>{width}}" for m in models)]
    for r in ranks:
        cells = [f"{100 * estimate(sh, Settings(rank=r)).trainable_params / sh.total_params:>{width - 1}.3f}%" for sh in shapes]
        lines.append(f"{r:>6}  " + "  ".join(cells))
    return "\n".join(lines)
