"""Which linear layers a `lora.target_modules` value selects, by PEFT's rule: `all-linear` is every linear layer
but the output layer, a listed name matches a module's full name or its dotted suffix. The estimator counts the
adapters and the recipe check refuses unknown names with this one rule, so that they agree with what PEFT wraps."""

from __future__ import annotations

ALL_LINEAR = "all-linear"
OUTPUT_LAYER = "lm_head"


def names_module(target: str, module_name: str) -> bool:
    """Whether one listed target names this module (`q_proj` and `self_attn.q_proj` name `layers.0.self_attn.q_proj`)."""
    return module_name == target or module_name.endswith("." + target)


def is_targeted(module_name: str, targets: str | list[str]) -> bool:
    """Whether PEFT puts an adapter on this linear layer for `targets`."""
    if targets == ALL_LINEAR:
        return not module_name.endswith(OUTPUT_LAYER)
    return any(names_module(t, module_name) for t in targets)
