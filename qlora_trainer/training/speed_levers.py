"""The speed levers that come from libraries made for them: liger-kernel's layer kernels and regional
torch.compile. TRL's activation offloading, packing and padding-free are SFTConfig options (trainer_setup.sft_config).

Each lever is a recipe key (train.kernels, train.compile, train.activation_offloading); the CUDA-only ones are
refused by name on a machine without CUDA rather than silently skipped.
"""

from __future__ import annotations

from qlora_trainer.errors import UserError, first_line


def check_levers(train, device: str) -> None:
    """Explicit CUDA-only levers on a machine without CUDA end in one line naming the key."""
    if device == "cuda":
        return
    if train.activation_offloading is True:
        raise UserError("train.activation_offloading: true needs a CUDA GPU (it copies activations to pinned CPU "
                        "memory on a side stream); set it to auto or false on the CPU")
    if train.kernels == "liger":
        raise UserError("train.kernels: liger needs a CUDA GPU (liger's kernels are Triton GPU code); set "
                        "train.kernels: auto to train on the CPU")


def apply_kernels(model, kernels: str) -> None:
    """liger-kernel's RMSNorm, RoPE and SwiGLU/GeGLU on this model instance. Its cross-entropy kernels stay off:
    TRL 1.16's fused LM head already scores tokens in chunks without materialising the logits, and liger's fused
    linear cross-entropy would replace the model's forward that TRL patches."""
    if kernels != "liger":
        return
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:  # installed but unusable here, e.g. without triton
        raise UserError(f"train.kernels: liger: liger-kernel cannot be imported ({first_line(err)}); install "
                        "triton (CUDA builds of torch bring it), or set train.kernels: none") from None
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, geglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


def decoder_layers(model) -> list:
    """The repeated decoder blocks: transformers builds each from GradientCheckpointingLayer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_decoder_layers(model) -> int:
    """Compile each decoder layer as one region (as Unsloth does), in place, after PEFT wrapped its projections:
    the layers share one compiled graph, so compiling costs about one layer's time rather than the whole model's,
    which did not finish one step in 200 s on an H100. Returns the number of layers compiled."""
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"train.compile: {type(model).__name__} has no transformers decoder layers to compile; "
                        "set train.compile: false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
