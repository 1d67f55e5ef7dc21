"""The TRL trainer and config of a preference method (dpo, orpo, kto), and the rows it trains on. The trainer is
the SFT path's checkpointing subclass (sft_trainer.py) over TRL's DPOTrainer, KTOTrainer or ORPOTrainer."""

from __future__ import annotations

from qlora_trainer.config.recipe import Recipe
from qlora_trainer.config.resolved_recipe import ResolvedRecipe
from qlora_trainer.dataset.preference_rows import unpaired
from qlora_trainer.errors import UserError
from qlora_trainer.training.sft_trainer import qlora_sft_trainer


def trainer_and_config(recipe: ResolvedRecipe, arguments: dict):
    """(trainer class, config) for train.method; `arguments` are the TrainingArguments every method shares."""
    method, t = recipe.train.method, recipe.train
    offload = t.activation_offloading
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        d = recipe.dpo
        return qlora_sft_trainer(DPOTrainer), DPOConfig(
            **arguments, max_length=t.seq_len, beta=d.beta, loss_type=[d.loss_type],
            label_smoothing=d.label_smoothing, activation_offloading=offload)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        k = recipe.kto
        return qlora_sft_trainer(KTOTrainer), KTOConfig(
            **arguments, max_length=t.seq_len, beta=k.beta, loss_type=k.loss_type, desirable_weight=k.desirable_weight,
            undesirable_weight=k.undesirable_weight, activation_offloading=offload)
    if offload:
        raise UserError("train.activation_offloading: TRL's ORPOTrainer cannot offload activations; set it to false")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return qlora_sft_trainer(ORPOTrainer), ORPOConfig(**arguments, max_length=t.seq_len, beta=recipe.orpo.beta)


def trainer_rows(recipe: Recipe, data):
    """(train, eval) rows as the method's trainer reads them. KTO takes labelled rows, pairs split into two."""
    if recipe.train.method != "kto":
        return data.train, data.eval
    # KTOTrainer reads its rows in order (its KL term pairs each row with its micro-batch neighbours): shuffled here
    # with the run's seed, or the two halves of a pair would always share a micro-batch, and a file sorted by label
    # would train on one label at a time.
    train = unpaired(data.train).shuffle(seed=recipe.train.seed)
    return train, unpaired(data.eval) if data.eval is not None else None


def describe_method(recipe: Recipe) -> list[str]:
    """The plan's lines on the method and the adapter it starts from (none for a new SFT adapter)."""
    method, adapter = recipe.train.method, recipe.model.adapter
    start = [f"continues the adapter of {adapter} (model.adapter)"] if adapter else []
    if method == "sft":
        return start
    section = getattr(recipe, method)
    keys = ", ".join(f"{k} {v}" for k, v in section.model_dump().items())
    reference = ("none (ORPO)" if method == "orpo" else "the adapter of model.adapter, frozen" if adapter
                 else "the base, adapter disabled")
    unit = "pair" if recipe.data.format != "kto" and method != "kto" else "row"
    return [f"{method}: {keys}; a sequence per step above is one {unit}; reference: {reference}"] + start
