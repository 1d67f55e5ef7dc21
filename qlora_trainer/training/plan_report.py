"""The plan a run prints before anything loads: model, adapters, data, batch arithmetic, speed levers, what the
`auto` settings were settled to, and warnings about settings that run code."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.config.recipe import Recipe
from qlora_trainer.config.recipe_files import launch_command
from qlora_trainer.distributed import Launch
from qlora_trainer.estimate.auto_settings import Plan
from qlora_trainer.training.preference_trainer import describe_method
from qlora_trainer.training.trainer_setup import optimizer_for


def describe_plan(recipe: Recipe, recipe_name: str, output_dir: Path, device: str, launch: Launch,
                  chosen: Plan) -> str:
    """What the run will do, printed before anything loads: the settings the recipe and the planner settled on
    (packing is settled once the rows are read: the data lines say what it became)."""
    t, lora, q = recipe.train, recipe.lora, recipe.quantization
    length = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    extras = "".join([", rsLoRA" if lora.use_rslora else "", ", DoRA" if lora.use_dora else ""])
    data = recipe.data.path + (f" (eval: {recipe.data.eval_path})" if recipe.data.eval_path else "")
    return "\n".join([
        f"qlora-trainer: recipe {recipe_name}",
        f"  model     {recipe.model.name_or_path}: 4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, "
        f"compute {q.compute_dtype}, {chosen.attn_implementation} attention{_attention_origin(chosen)}",
        f"  lora      r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {targets}{extras}, {lora.dtype} adapters",
        f"  data      {data}, format {recipe.data.format}",
        f"  training  {length}, {_batch_arithmetic(t, chosen.micro_batch_size, launch.world_size)} sequences/step, seq_len {t.seq_len}, lr {t.learning_rate:g} "
        f"{t.lr_scheduler}, {_optimizer(t.optimizer, device)}",
        f"  speed     {_levers(t, chosen)}",
    ] + [f"  method    {line}" for line in describe_method(recipe)] + (
        [f"  auto      {chosen.describe()}"] if chosen.chosen else []) + [
        f"  device    {device}, {launch.describe()}",
        f"  output    {output_dir}",
    ] + [f"  NOTE      {note}" for note in _launch_notes(recipe, recipe_name, launch)]
      + [f"  WARNING   {warning}" for warning in _security_warnings(recipe)])


def _attention_origin(chosen: Plan) -> str:
    return " (auto: transformers' choice for the model)" if "attn_implementation" in chosen.chosen else ""


def _launch_notes(recipe: Recipe, recipe_name: str, launch: Launch) -> list[str]:
    """Say so when a multi-GPU recipe is launched otherwise than it was written for (the estimate follows the
    launch). Any recipe may run under DDP: that needs no note."""
    d = recipe.distributed
    if d.strategy == "single" or (d.strategy, d.num_gpus, d.cpu_offload) == (launch.strategy, launch.world_size,
                                                                           launch.cpu_offload):
        return []
    written = f"{d.strategy} on {d.num_gpus} GPUs{' with CPU offload' if d.cpu_offload else ''}"
    return [f"this recipe is written for {written}: {launch_command(recipe, recipe_name)}"]


def _optimizer(name: str, device: str) -> str:
    used = optimizer_for(name, device)
    return name if used == name else f"{name} (as {used} on the CPU: bitsandbytes pages only on CUDA)"


def _levers(t, chosen: Plan) -> str:
    def on(flag) -> str:
        return "auto" if flag == "auto" else "on" if flag else "off"

    packing = f", packing {on(t.packing)}, padding-free {on(t.padding_free)}" if t.method == "sft" else ""
    return (f"checkpointing {on(chosen.gradient_checkpointing)}, activation offloading "
            f"{on(chosen.activation_offloading)}, kernels {chosen.kernels}, compile {on(t.compile)}{packing}")


def _batch_arithmetic(t, micro_batch_size: int, world_size: int) -> str:
    accumulation = t.accumulation_for(micro_batch_size, world_size)
    per_process = f"{micro_batch_size} x {accumulation} accumulation"
    total = micro_batch_size * accumulation * world_size
    return f"{per_process} x {world_size} processes = {total}" if world_size > 1 else f"{per_process} = {total}"


def _security_warnings(recipe: Recipe) -> list[str]:
    warnings = []
    if recipe.model.trust_remote_code:
        warnings.append(f"model.trust_remote_code is on: Python code from {recipe.model.name_or_path} will run")
    if recipe.model.allow_pickle_weights:
        warnings.append("model.allow_pickle_weights is on: pickle weights can run code when loaded")
    return warnings
