"""Turn a recipe into the estimator's settings: the one place that reads the recipe for the estimator."""

from __future__ import annotations

from qlora_trainer.config.resolved_recipe import ResolvedRecipe
from qlora_trainer.estimate.types import Settings


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
