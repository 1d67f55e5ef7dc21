"""Settle a recipe's `auto` training settings for the GPU in front of the run, before any weights load.

The estimator predicts every candidate's peak memory; a small speed model, measured on an H100, ranks the
candidates that fit; the fastest one wins. Explicit values in a recipe are obeyed and only the `auto` keys
are chosen. `plan()` says what was chosen and why, before the rows are read; `resolve()` then settles packing
from the rows as measured and returns the ResolvedRecipe the run trains with (saved as its recipe.yaml, so a
resume trains exactly as the run started).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qlora_trainer.config.recipe import AUTO, Recipe
from qlora_trainer.config.resolved_recipe import ResolvedRecipe, concrete
from qlora_trainer.errors import UserError
from qlora_trainer.estimate import attention, estimate_output, fit_rule
from qlora_trainer.estimate.memory import GIB, Estimate, ModelShape, estimate
from qlora_trainer.estimate.method_memory import min_micro_batch
from qlora_trainer.estimate.recipe_settings import settings_from_recipe
from qlora_trainer.estimate.types import Budget

# Relative time per token of a training step, measured on an H100 (llama-7b shape, r=8, seq_len 2048,
# the H100 figures in docs/speed.md): 3,405 tokens/s at micro-batch 1 and 7,411 at 4 with checkpointing, 4,944 at
# micro-batch 1 without. Time per token = (1 + PER_MICRO_STEP / micro_batch) x (RECOMPUTE if checkpointing):
# a fixed cost per micro-step that larger micro-batches share, and the recomputed forward. TRL's activation
# offloading costs 0.5%. Only the order of the candidates matters, and that order holds across model sizes.
PER_MICRO_STEP = 2.577
RECOMPUTE = 1.452
OFFLOAD = 1.005

# Packing pays when rows are short: at most this share of seq_len on average (Alpaca-shaped rows at seq_len
# 2048 trained 1.7x faster packed on the H100).
PACK_BELOW = 0.5


# liger-kernel's dict from model type to its patch function (liger_kernel/transformers/monkey_patch.py).
LIGER_REGISTRY = "MODEL_TYPE_TO_APPLY_LIGER_FN"

# Offloaded activations live in pinned (page-locked) CPU memory, which the OS cannot swap: plan to pin at most
# this share of the RAM that is available, so the machine stays usable and the data loader has room.
PINNED_RAM_SHARE = 0.5


@dataclass
class Plan:
    micro_batch_size: int
    gradient_checkpointing: bool
    activation_offloading: bool
    kernels: str
    estimate: Estimate  # of the chosen settings; packing not yet known, so the worst case (estimate_unpacked)
    budget: Budget
    fits: bool
    chosen: list[str]  # the keys that were `auto`
    notes: list[str] = dataclasses.field(default_factory=list)
    attn_implementation: str = "sdpa"  # the implementation the model runs with (settled from `auto`)
    on_gpu: bool = True

    @property
    def predicted_gib(self) -> float:
        return self.estimate.total / GIB

    def levers(self) -> dict:
        """The train keys the plan settled, as recipe values."""
        return {"micro_batch_size": self.micro_batch_size, "gradient_checkpointing": self.gradient_checkpointing,
                "activation_offloading": self.activation_offloading, "kernels": self.kernels}

    def describe(self) -> str:
        """What the `auto` keys became, and why: "micro-batch 8, checkpointing on: 11.2 of 12.0 GiB predicted
        (the fastest that fits; budget: ...)". Keys the recipe set are not repeated."""
        values = {"micro_batch_size": f"micro-batch {self.micro_batch_size}",
                  "gradient_checkpointing": f"checkpointing {_on(self.gradient_checkpointing)}",
                  "activation_offloading": f"offloading {_on(self.activation_offloading)}",
                  "kernels": f"kernels {self.kernels}", "attn_implementation": f"{self.attn_implementation} attention"}
        settings = ", ".join(values[key] for key in values if key in self.chosen) or "nothing was auto"
        if self.budget.gib is None:
            return f"{settings} ({self.budget.source})"
        verdict = "the fastest that fits" if self.fits else "nothing fits; this is the smallest"
        return (f"{settings}: {self.predicted_gib:.1f} of {self.budget.gib:.1f} GiB predicted "
                f"({verdict}; budget: {self.budget.source})")

    def to_json(self) -> dict:
        return {**self.levers(), "attn_implementation": self.attn_implementation, "predicted_gib": round(self.predicted_gib, 3),
                "budget_gib": self.budget.gib, "budget_source": self.budget.source, "fits": self.fits, "chosen": self.chosen,
                "reason": self.describe(), "notes": self.notes}


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def relative_time_per_token(micro_batch: int, checkpointing: bool, offloading: bool) -> float:
    """The speed model above: lower is faster. Only its order matters to the planner."""
    return (1 + PER_MICRO_STEP / micro_batch) * (RECOMPUTE if checkpointing else 1) * (OFFLOAD if offloading else 1)


def plan(recipe: Recipe, shape: ModelShape, budget: Budget, on_gpu: bool, launch=None) -> Plan:
    """Choose the `auto` micro-batch, checkpointing and offloading: of the combinations predicted to fit (fit_rule)
    and whose offloaded activations fit in the CPU RAM, the fastest by the speed model. That is often a smaller
    micro-batch without checkpointing rather than a larger one that recomputes every layer. Without a budget (CPU,
    or an estimate without --gpu-memory), `auto` keeps the schema's safe defaults: micro-batch 1, checkpointing
    on, offloading off.
    The attention implementation is settled first: its activation terms differ (eager keeps seq_len^2 scores)."""
    attn = attention.resolve(shape, recipe.model.attn_implementation)
    auto_attention = ["attn_implementation"] if recipe.model.attn_implementation == AUTO else []
    t = recipe.train
    world = launch.world_size if launch is not None else recipe.distributed.num_gpus
    kernels, notes = choose_kernels(recipe, shape.model_type, on_gpu)
    fixed = _fixed_levers(recipe)
    chosen = [key for key, value in fixed.items() if value == AUTO] + (["kernels"] if t.kernels == AUTO else [])
    smallest = min_micro_batch(t.method)
    common = dict(kernels=kernels, budget=budget, chosen=chosen + auto_attention, attn_implementation=attn,
                  on_gpu=on_gpu)
    if budget.gib is None or not on_gpu:
        defaults = {"micro_batch_size": smallest, "gradient_checkpointing": True, "activation_offloading": False}
        values = {key: defaults[key] if value == AUTO else value for key, value in fixed.items()}
        est = estimate_unpacked(recipe, shape, launch, attn_implementation=attn, kernels=kernels, **values)
        return Plan(**values, estimate=est, fits=True, notes=notes, **common)
    scored = _score(recipe, shape, kernels, attn, launch, fixed, t.global_batch(world) // world, budget, smallest)
    fitting = [c for c in scored if c.fits]
    # The fastest candidate by the speed model; among equally fast ones the larger micro-batch, then the smaller
    # prediction. Where nothing fits, the smallest, so that the fit check names the fixes.
    best = (min(fitting, key=lambda c: (c.time_per_token, -c.values["micro_batch_size"], c.predicted_gib))
            if fitting else min(scored, key=lambda c: c.predicted_gib))
    return Plan(**best.values, estimate=best.estimate, fits=bool(fitting),
                notes=notes + _ram_note(scored, best, budget), **common)


def _fixed_levers(recipe: Recipe) -> dict:
    """The planned keys as the recipe sets them (`auto` or a value). ORPO's `auto` offloading is off: TRL's ORPO
    trainer has no activation offloading."""
    t = recipe.train
    offloading = False if t.method == "orpo" and t.activation_offloading == AUTO else t.activation_offloading
    return {"micro_batch_size": t.micro_batch_size, "gradient_checkpointing": t.gradient_checkpointing,
            "activation_offloading": offloading}


@dataclass(frozen=True)
class _Candidate:
    values: dict
    estimate: Estimate
    predicted_gib: float
    offloaded_gib: float  # pinned CPU RAM for offloaded activations
    time_per_token: float
    fits: bool


def _score(recipe: Recipe, shape: ModelShape, kernels: str, attn: str, launch, fixed: dict, per_process_batch: int,
           budget: Budget, smallest: int) -> list[_Candidate]:
    scored = []
    for values in _candidates(fixed, per_process_batch, smallest):
        est = estimate_unpacked(recipe, shape, launch, attn_implementation=attn, kernels=kernels, **values)
        offloaded = est.activation_offload_bytes / GIB
        ram_ok = budget.host_gib is None or offloaded <= PINNED_RAM_SHARE * budget.host_gib
        scored.append(_Candidate(values, est, est.total / GIB, offloaded, relative_time_per_token(**_speed_keys(values)),
                                 fit_rule.fits(est.total / GIB, budget.gib) and ram_ok))
    return scored


def _speed_keys(values: dict) -> dict:
    return {"micro_batch": values["micro_batch_size"], "checkpointing": values["gradient_checkpointing"],
            "offloading": values["activation_offloading"]}


def _ram_note(scored: list[_Candidate], best: _Candidate, budget: Budget) -> list[str]:
    """Say so when a faster candidate was ruled out only by the CPU RAM its offloaded activations would pin."""
    if budget.host_gib is None:
        return []
    ruled_out = [c for c in scored if fit_rule.fits(c.predicted_gib, budget.gib) and not c.fits
                 and c.time_per_token < best.time_per_token]
    if not ruled_out:
        return []
    need = min(c.offloaded_gib for c in ruled_out)
    return [f"activation offloading would pin {need:.1f} GiB of CPU RAM, over {PINNED_RAM_SHARE:.0%} of the "
            f"{budget.host_gib:.1f} GiB available: not chosen"]


def _candidates(fixed: dict, per_process_batch: int, smallest: int = 1) -> list[dict]:
    """Every combination of the auto keys' values; micro-batches divide the per-process global batch, so the
    accumulation that keeps the global batch is a whole number, and are at least what the method needs."""
    options = {
        "micro_batch_size": [m for m in range(smallest, per_process_batch + 1) if per_process_batch % m == 0],
        "gradient_checkpointing": [False, True],
        "activation_offloading": [False, True],
    }
    combos = [{}]
    for key, value in fixed.items():
        combos = [dict(c, **{key: v}) for c in combos for v in (options[key] if value == AUTO else [value])]
    # Offloading was measured with checkpointing, where it moves only each layer's input; without checkpointing
    # it would stream every saved activation over PCIe, which the speed model does not describe.
    return [c for c in combos if c["gradient_checkpointing"] or not c["activation_offloading"]
            or fixed["gradient_checkpointing"] is False and fixed["activation_offloading"] is True]


def estimate_unpacked(recipe: Recipe, shape: ModelShape, launch=None, **levers) -> Estimate:
    """The estimate for these planned values, before the rows say whether to pack: the worst case, a micro-batch
    of full seq_len sequences, costs the same memory packed or not (eager attention, where it would not, never
    packs)."""
    return estimate(shape, settings_from_recipe(_resolved(recipe, levers, {}), launch))


def resolve(recipe: Recipe, chosen: Plan, data_format: str | None = None,
            mean_tokens: float | None = None) -> tuple[ResolvedRecipe, list[str]]:
    """The one step that settles every `auto`: the plan's levers and attention, the data format as detected and
    packing from the rows' mean length in tokens. Without rows (an estimate, a dry run that cannot read them)
    packing stays off unless the recipe turns it on, as `estimate_unpacked` assumes. Returns the resolved
    recipe and the notes on what packing became."""
    packing, notes = _packing(recipe, chosen, mean_tokens)
    levers = {**chosen.levers(), "attn_implementation": chosen.attn_implementation}
    return _resolved(recipe, levers, packing, data_format), notes


def _resolved(recipe: Recipe, levers: dict, packing: dict, data_format: str | None = None) -> ResolvedRecipe:
    t = recipe.train
    train = {key: value for key, value in levers.items() if key != "attn_implementation"}
    train.update({"packing": t.packing is True, "padding_free": t.padding_free is True, **packing})
    return concrete(recipe, model={"attn_implementation": levers["attn_implementation"]}, train=train,
                    data={"format": data_format} if data_format else None)


# ---------------------------------------------------------------- kernels and packing


def liger_supports(model_type: str) -> bool:
    """Whether liger-kernel has layer kernels for this model type (its own registry, not a list of ours)."""
    return model_type in liger_model_types()


@functools.cache
def liger_model_types() -> frozenset[str]:
    """liger-kernel's registry of model types, read from its source: importing it pulls triton, PEFT and
    bitsandbytes, seconds that an estimate does not need. Training imports it for real (speed_levers.py), and an
    installation that cannot import stops there with one line."""
    spec = importlib.util.find_spec("liger_kernel")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    source = Path(spec.submodule_search_locations[0]) / "transformers" / "monkey_patch.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(getattr(target, "id", None) == LIGER_REGISTRY for target in node.targets)):
            return frozenset(key.value for key in node.value.keys if isinstance(key, ast.Constant))
    # A liger-kernel that builds its registry some other way: ask it (slower, same answer).
    from liger_kernel.transformers import monkey_patch

    return frozenset(getattr(monkey_patch, LIGER_REGISTRY))


def choose_kernels(recipe: Recipe, model_type: str, on_gpu: bool) -> tuple[str, list[str]]:
    """`auto`: liger on a CUDA GPU where liger supports the model type; an explicit `liger` it cannot honour is
    an error naming the key."""
    wanted = recipe.train.kernels
    if wanted == "none":
        return "none", []
    supported = liger_supports(model_type)
    if wanted == "liger":
        if not supported:
            raise UserError(f"train.kernels: liger: liger-kernel is not installed or has no kernels for model type "
                            f"'{model_type}'; pip install 'qlora-trainer[cuda]', or set train.kernels: none (or auto)")
        if not on_gpu:
            raise UserError("train.kernels: liger needs a CUDA GPU (liger's kernels are Triton GPU code); "
                            "set train.kernels: auto to train on the CPU")
        return "liger", []
    if on_gpu and not supported:
        why = (f"liger-kernel has no kernels for model type '{model_type}'" if liger_model_types()
               else "liger-kernel is not installed (pip install 'qlora-trainer[cuda]')")
        return "none", [f"kernels: {why}; transformers' own are used"]
    return ("liger" if on_gpu else "none"), []


def _packing(recipe: Recipe, chosen: Plan, mean_tokens: float | None) -> tuple[dict, list[str]]:
    """`auto` packing: on a GPU, pack when rows average at most PACK_BELOW of seq_len; padding-free follows
    packing. Eager attention stays unpacked: over a padding-free row it scores every token against every other
    of the micro-batch, micro-batch^2 times the memory of separate rows. Preference methods never pack (TRL's
    DPO trainer falls back to padding; the others have none)."""
    t = recipe.train
    if t.method != "sft":
        return {"packing": False, "padding_free": False}, []
    if mean_tokens is None or (t.packing != AUTO and t.padding_free != AUTO):
        return {}, []
    eligible = chosen.on_gpu and chosen.attn_implementation != "eager"
    packing = t.packing if t.packing != AUTO else eligible and mean_tokens <= PACK_BELOW * t.seq_len
    padding_free = t.padding_free if t.padding_free != AUTO else bool(packing)
    notes = []
    if t.packing == AUTO:
        why = ("rows average {:.0f} tokens, at most {:.0%} of seq_len {}".format(mean_tokens, PACK_BELOW, t.seq_len)
               if packing else "off on the CPU" if not chosen.on_gpu else "eager attention" if not eligible
               else f"rows average {mean_tokens:.0f} tokens, over {PACK_BELOW:.0%} of seq_len {t.seq_len}")
        notes.append(f"packing {_on(packing)} (auto: {why}), padding-free {_on(padding_free)}")
    return {"packing": packing, "padding_free": padding_free}, notes


def estimate_json(est: Estimate, chosen: Plan) -> dict:
    """The estimate's contract JSON with the settled values at the top, as `estimate --json`, estimate.json and
    the plan all report them."""
    return {**estimate_output.estimate_json(est, chosen.budget.gib), **chosen.levers(), "auto": chosen.to_json()}
