"""The estimator's front end: find a model's shape, turn a recipe into estimator settings, print the
breakdown, search for settings that fit, and stop a run that will not fit before it loads anything."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qlora_trainer.config.resolved_recipe import ResolvedRecipe
from qlora_trainer.errors import UserError, WontFitError
from qlora_trainer.estimate import fit_rule
from qlora_trainer.estimate.memory import GIB, Estimate, ModelShape, Settings, estimate, model_shape
from qlora_trainer.estimate.shape_cache import cached_shape
from qlora_trainer.loading.architectures import (
    DEFAULT_FOR_SIZE,
    architecture_for,
    architecture_text,
    known_architectures,
    load_architecture,
)
from qlora_trainer.loading.model_checks import check_causal_lm, check_config_file

TABLE_RANKS = (1, 2, 4, 8, 16, 64, 256, 1024)
TABLE_MODELS = ("llama-2-7b", "mistral-7b", "llama-3.1-8b", "qwen2.5-7b", "llama-2-13b", "qwen2.5-14b", "llama-2-70b")


def shape_for_model(name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    """A model's shape from a known architecture (offline), a local directory or config.json, or the hub."""
    known = architecture_for(name_or_path)
    if known:
        return cached_shape(architecture_text(known), known, lambda: _checked_shape(load_architecture(known), known))
    local = _config_file(name_or_path)
    if local is not None:  # every check reads only the config's text: a cached shape passed them all
        text = f"{local.read_text(encoding='utf-8', errors='replace')}\ntrust_remote_code={trust_remote_code}"
        return cached_shape(text, name_or_path,
                            lambda: _checked_shape(_read_config(name_or_path, trust_remote_code), name_or_path))
    return _checked_shape(_read_config(name_or_path, trust_remote_code), name_or_path)


def _config_file(name_or_path: str) -> Path | None:
    """The config.json of a local model (a directory, the file itself, or a built demo model); None otherwise."""
    from qlora_trainer.loading.demo_model import demo_model_path, is_demo_model

    path = demo_model_path(name_or_path) if is_demo_model(name_or_path) else Path(name_or_path).expanduser()
    path = path / "config.json" if path.is_dir() else path
    return path if path.is_file() else None


def _checked_shape(config, name: str) -> ModelShape:
    check_causal_lm(config, name)  # train, estimate and recipes all come through here
    return _supported_shape(config, name)


def _supported_shape(config, name: str) -> ModelShape:
    if config.get_text_config() is not config:
        # A composite config (text plus vision or audio) loads as the whole multimodal model: LoRA's all-linear
        # would wrap the vision tower too, and the estimator's terms describe the language model only.
        raise UserError(f"model.name_or_path: '{name}' is a multimodal model ({config.model_type}, "
                        f"{', '.join(config.architectures or ['no architectures listed'])}); qlora-trainer trains "
                        "text-only causal language models: use a text-only checkpoint of the family")
    try:
        return model_shape(config, name)
    except (AttributeError, ValueError, KeyError) as err:  # configs without the decoder fields the estimator reads
        raise UserError(f"the estimator cannot read the architecture of '{name}' ({err}); it supports decoder "
                        "models with Llama-style configs (hidden_size, intermediate_size, num_attention_heads)") from None


def _read_config(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from qlora_trainer.loading.demo_model import demo_model_path, is_demo_model

    path = demo_model_path(name_or_path) if is_demo_model(name_or_path) else Path(name_or_path).expanduser()
    if path.exists():
        check_config_file(path, name_or_path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        raise UserError(f"cannot read a config for '{name_or_path}': pass a local model directory or config.json, "
                        f"or a known architecture ({', '.join(known_architectures())})") from None


def shape_for_size(size: str) -> ModelShape:
    key = size.upper()
    if key not in DEFAULT_FOR_SIZE:
        raise UserError(f"--model-size {size}: known sizes are {', '.join(DEFAULT_FOR_SIZE)}")
    return shape_for_model(DEFAULT_FOR_SIZE[key])


def settings_from_recipe(recipe: ResolvedRecipe, launch=None) -> Settings:
    """Estimator inputs from a resolved recipe, for the launch given (a run's), else the one the recipe is
    written for."""
    lora, train = recipe.lora, recipe.train
    if launch is None:
        d = recipe.distributed
        strategy, gpus, offload = d.strategy, d.num_gpus, d.cpu_offload
    else:
        strategy, gpus, offload = launch.strategy, launch.world_size, launch.cpu_offload
    return Settings(
        rank=lora.r, target_modules=lora.target_modules, lora_dropout=lora.dropout, use_dora=lora.use_dora,
        lora_dtype=lora.dtype, compute_dtype=recipe.quantization.compute_dtype,
        double_quant=recipe.quantization.double_quant, seq_len=train.seq_len, batch_size=train.micro_batch_size,
        optimizer=train.optimizer, gradient_checkpointing=train.gradient_checkpointing,
        attn_implementation=recipe.model.attn_implementation,
        strategy=strategy, num_gpus=gpus, cpu_offload=offload,
        activation_offloading=train.activation_offloading, kernels=train.kernels,
        padding_free=train.padding_free, packing=train.packing, method=train.method,
    )


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


def rank_table(models: tuple[str, ...] = TABLE_MODELS, ranks: tuple[int, ...] = TABLE_RANKS) -> str:
    """Trainable share of parameters by LoRA rank (all linear layers), exact for each architecture."""
    shapes = [shape_for_model(m) for m in models]
    width = max(len(m) for m in models)
    lines = [f"{'rank':>6}  " + "  ".join(f"{m:>{width}}" for m in models)]
    for r in ranks:
        cells = [f"{100 * estimate(sh, Settings(rank=r)).trainable_params / sh.total_params:>{width - 1}.3f}%" for sh in shapes]
        lines.append(f"{r:>6}  " + "  ".join(cells))
    return "\n".join(lines)


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
