"""Which attention implementation a model runs with, read off its meta-device instance before any weights load.

`auto` is what transformers picks for the model class when it is given none: SDPA where the class supports it,
else eager (Gemma-2's attention-logit soft-capping is written only for eager). An explicit choice is checked
against the class the same way transformers checks it when loading, so a refusal is known before the estimate.
"""

from __future__ import annotations

from qlora_trainer.config.recipe import AUTO
from qlora_trainer.errors import UserError
from qlora_trainer.estimate.types import ModelShape

# The implementations model.attn_implementation offers, in the order a refusal lists the alternatives.
IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def default_implementation(model) -> str:
    """What transformers gives the model when it is asked for nothing."""
    return model.get_correct_attn_implementation(None, is_init_check=True)


def supported_implementations(model) -> tuple[str, ...]:
    """The implementations the model class accepts. A missing package (flash-attn on this machine) is not the
    model's refusal: loading names the package when the run really needs it."""
    found = []
    for name in IMPLEMENTATIONS:
        try:
            model.get_correct_attn_implementation(name, is_init_check=True)
        except ImportError:
            pass
        except ValueError:
            continue
        found.append(name)
    return tuple(found)


def resolve(shape: ModelShape, requested: str) -> str:
    """The implementation a run with `model.attn_implementation: requested` gets; a refused choice is bad input."""
    if requested == AUTO:
        return shape.default_attention
    if requested in shape.supported_attention:
        return requested
    raise UserError(f"model.attn_implementation: {requested} is not supported by {shape.model_class} ({shape.name}), "
                    f"which supports {', '.join(shape.supported_attention)}; set model.attn_implementation: auto "
                    f"(transformers picks {shape.default_attention} for it) or one of those")
