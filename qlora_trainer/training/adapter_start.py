"""The adapter a run trains: a new LoRA adapter (given to TRL as a config, so that TRL wraps the 4-bit base as it
does for every method), or the adapter of model.adapter loaded trainable."""

from __future__ import annotations

from qlora_trainer.config.recipe import Recipe
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.continued_adapter import adapter_dir


def peft_start(model, recipe: Recipe):
    """(model, peft_config) for the trainer. A continued adapter comes as a PEFT model and no config; DPO and KTO
    then keep a frozen copy of it, named "ref", as their reference (TRL's dpo_trainer.py, kto_trainer.py)."""
    if recipe.model.adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir(recipe.model.adapter), is_trainable=True), None
    config = model_lib.lora_config(recipe.lora)
    if recipe.train.method == "orpo":
        from peft import get_peft_model
        from transformers import set_seed

        # Given a config, TRL's ORPOTrainer calls prepare_model_for_kbit_training on a 4-bit base, which casts every
        # non-4-bit parameter to fp32 (DESIGN.md, known traps: 2 GB more on Llama-3-8B). Wrapped here, it does not.
        set_seed(recipe.train.seed)  # as TRL seeds before it initialises an adapter
        return get_peft_model(model, config), None
    return model, config
