"""The recipe a run trains with: every `auto` settled to a concrete value, and nothing changeable.

A `Recipe` is what the user wrote, `auto` values and all. Planning (estimate/auto_settings.resolve) turns it into
a `ResolvedRecipe` once; everything after planning takes only that type, so no later stage has to ask whether a
value is still `auto`, and no stage can change what the run trains with after it was saved as recipe.yaml.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from qlora_trainer.config.recipe import (
    DataSection,
    DistributedSection,
    DpoSection,
    EvalSection,
    ExportSection,
    KtoSection,
    LoraSection,
    ModelSection,
    OrpoSection,
    QuantizationSection,
    Recipe,
    TrainSection,
)

FROZEN = ConfigDict(extra="forbid", frozen=True)


class ResolvedModel(ModelSection):
    model_config = FROZEN
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"]


class ResolvedTrain(TrainSection):
    model_config = FROZEN
    micro_batch_size: int = Field(gt=0)
    packing: bool
    padding_free: bool
    gradient_checkpointing: bool
    activation_offloading: bool
    kernels: Literal["liger", "none"]

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step in each process."""
        return self.accumulation_for(self.micro_batch_size, world_size)


class ResolvedData(DataSection):
    model_config = FROZEN
    # `auto` when the rows were not read (an estimate): the format does not change the memory a run needs.
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text", "preference", "kto"]


def _frozen(section: type[BaseModel]) -> type[BaseModel]:
    """A section planning does not touch, frozen as it is."""
    name = "Resolved" + section.__name__.removesuffix("Section")
    return type(name, (section,), {"model_config": FROZEN, "__module__": __name__, "__doc__": section.__doc__})


ResolvedQuantization = _frozen(QuantizationSection)
ResolvedLora = _frozen(LoraSection)
ResolvedDpo = _frozen(DpoSection)
ResolvedOrpo = _frozen(OrpoSection)
ResolvedKto = _frozen(KtoSection)
ResolvedEval = _frozen(EvalSection)
ResolvedExport = _frozen(ExportSection)
ResolvedDistributed = _frozen(DistributedSection)


class ResolvedRecipe(Recipe):
    model_config = FROZEN
    model: ResolvedModel
    quantization: ResolvedQuantization = ResolvedQuantization()
    lora: ResolvedLora = ResolvedLora()
    data: ResolvedData
    train: ResolvedTrain
    dpo: ResolvedDpo = ResolvedDpo()
    orpo: ResolvedOrpo = ResolvedOrpo()
    kto: ResolvedKto = ResolvedKto()
    eval: ResolvedEval = ResolvedEval()
    export: ResolvedExport = ResolvedExport()
    distributed: ResolvedDistributed = ResolvedDistributed()


def concrete(recipe: Recipe, *, model: dict | None = None, train: dict | None = None,
             data: dict | None = None) -> ResolvedRecipe:
    """`recipe` with these keys set, as a ResolvedRecipe: validated again, so that settling can neither produce a
    recipe the schema would refuse nor leave an `auto` behind (pydantic names the key that is still `auto`)."""
    raw = recipe.model_dump(mode="json")
    for section, values in (("model", model), ("train", train), ("data", data)):
        raw[section].update(values or {})
    return ResolvedRecipe.model_validate(raw)
