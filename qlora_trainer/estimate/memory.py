"""The VRAM estimator: predict a run's peak GPU memory term by term, before anything is loaded.

Shapes come from the model built on PyTorch's `meta` device: exact module shapes for any architecture the
installed transformers knows, with no memory allocated. Everything after that is arithmetic on those shapes;
each term's comment says where its formula comes from. Sizes are bytes; GiB = 2**30 bytes.
"""

from __future__ import annotations

import math

from qlora_trainer.estimate import method_memory
from qlora_trainer.estimate.activation_memory import DTYPE_BYTES, activation_peak
from qlora_trainer.estimate.types import GIB, Estimate, Linear, ModelShape, Settings
from qlora_trainer.loading.lora_targets import is_targeted

# bitsandbytes 4-bit: values packed two per byte, one absmax per block of 64 (functional.quantize_4bit).
NF4_BLOCK = 64
# Double quantization re-quantizes the absmax values to 8 bits in blocks of 256 (quantize_blockwise).
NESTED_BLOCK = 256
# Per quantized weight: the 16-entry fp32 code table; with double quantization also the nested absmax's fp32 offset.
CODE_TABLE_BYTES = 16 * 4
NESTED_OFFSET_BYTES = 4
# bitsandbytes 8-bit optimizers keep tensors under this many elements in 32-bit state (Optimizer8bit.min_8bit_size).
MIN_8BIT_SIZE = 4096
OPTIMIZER_BLOCK = 256  # blockwise 8-bit state: one fp32 absmax per 256 values and state
# Paged state goes to CUDA managed memory for tensors of at least this many elements (get_state_buffer).
MIN_PAGED_SIZE = 100_000

# The two terms not derived from shapes, calibrated on one H100 80GB (torch 2.11, CUDA 13, driver 580) in the 14
# configurations of benchmarks/vram/h100-2026-11-22.jsonl:
# - Memory the process holds outside PyTorch's allocator: the CUDA context, the kernel images loaded as they are
#   first used, cuBLAS/cuDNN handles. nvidia-smi's per-process figure minus torch's peak reserved was 0.740-0.749
#   GiB in every configuration (rank, length, batch and checkpointing changed nothing); 0.51 of it exists at start.
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
# - The caching allocator's reserve beyond its allocated peak. It comes from tensors that outlive the transient
#   ones they are allocated among, and split the cached blocks those leave: each layer's output (the residual
#   stream, kept for backward or checkpointed) in forward, the adapter gradients in backward. Measured reserved
#   minus allocated grew with those bytes (micro-batch 4: 0.40-0.96 GiB; rank 64: +0.11-0.16 GiB over rank 8)
#   and had a floor of ~0.17 GiB at seq_len 512 (the small-tensor pool's 2 MiB segments, block rounding).
#   One share and one floor for all 14 configurations, not a fit per family.
ALLOCATOR_OVERHEAD_FRACTION = 0.36
ALLOCATOR_OVERHEAD_FLOOR_BYTES = int(0.1 * GIB)
CALIBRATED = True


def unmeasured_notes(s: Settings) -> list[str]:
    """Where the GPU measurements do not reach, said in every estimate that depends on it."""
    notes = ["cuda_context and allocator_overhead are calibrated on one H100 (CUDA 13, torch 2.11); other GPUs, "
             "drivers and CUDA versions may hold a different context"]
    unmeasured = [name for name, used in (
        ("eager attention", s.attn_implementation == "eager"), ("padding-free batches", s.padding_free or s.packing),
        (f"{s.strategy.upper()} across GPUs", s.strategy != "single"), ("DoRA", s.use_dora),
        (f"train.method {s.method}", s.method != "sft")) if used]
    if unmeasured:
        notes.append(f"not yet measured on a GPU: {', '.join(unmeasured)} (the terms follow the libraries' code)")
    return notes


# ---------------------------------------------------------------- reading shapes


def model_shape(config, name: str) -> ModelShape:
    """Build the model on the meta device (no memory) and read every linear layer's shape."""
    import torch

    from qlora_trainer.estimate.attention import default_implementation, supported_implementations
    from qlora_trainer.loading.model import meta_model, quantized_linear_names

    model = meta_model(config)
    quantized = quantized_linear_names(model)
    linears = [Linear(n, m.in_features, m.out_features, m.bias is not None, n in quantized)
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    params = dict(model.named_parameters())  # deduplicates tied parameters
    linear_params = {f"{l.name}.weight" for l in linears} | {f"{l.name}.bias" for l in linears if l.has_bias}
    text = config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(
        name=name,
        model_type=text.model_type,
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        linears=linears,
        other_params=sum(p.numel() for n, p in params.items() if n not in linear_params),
        total_params=sum(p.numel() for p in params.values()),
        norms_per_layer=_norms_per_layer(model, text, linear_params),
        attn_softcapping=getattr(text, "attn_logit_softcapping", None) is not None,
        model_class=type(model).__name__,
        default_attention=default_implementation(model),
        supported_attention=supported_implementations(model),
        max_positions=getattr(text, "max_position_embeddings", None),
    )


def _norms_per_layer(model, text, linear_params: set[str]) -> int:
    """Hidden-size vectors among the first decoder layer's parameters that no linear layer owns: its norms."""
    import torch

    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers]
    if not stacks:
        return 2
    prefix, layers = stacks[0]
    return sum(1 for n, p in layers[0].named_parameters()
               if p.ndim == 1 and p.numel() == text.hidden_size and f"{prefix}.0.{n}" not in linear_params)


def allocator_overhead_bytes(shape: ModelShape, s: Settings, grads: int) -> int:
    """Reserved beyond allocated at the peak: the floor plus a share of the long-lived tensors allocated among
    transient ones (every layer's output, the adapter gradients); see ALLOCATOR_OVERHEAD_FRACTION."""
    layer_outputs = shape.layers * DTYPE_BYTES[s.compute_dtype] * shape.hidden * s.batch_size * s.seq_len
    return ALLOCATOR_OVERHEAD_FLOOR_BYTES + int(ALLOCATOR_OVERHEAD_FRACTION * (layer_outputs + grads))


def lora_targets(shape: ModelShape, targets: str | list[str]) -> list[Linear]:
    """The layers PEFT wraps."""
    return [l for l in shape.linears if is_targeted(l.name, targets)]


# ---------------------------------------------------------------- the terms


def estimate(shape: ModelShape, s: Settings) -> Estimate:
    compute = DTYPE_BYTES[s.compute_dtype]
    targets = lora_targets(shape, s.target_modules)
    lora_tensors = _lora_tensor_sizes(targets, s)
    trainable = sum(lora_tensors)
    optimizer_bytes, paged = optimizer_state_bytes(lora_tensors, s.optimizer, DTYPE_BYTES[s.lora_dtype])
    grads = lora_param_bytes(lora_tensors, targets, s)
    policy = method_memory.policy_settings(s)  # the rows that run with gradients: a pair is two
    peak = activation_peak(shape, targets, policy)
    breakdown = {
        "base_weights": base_weight_bytes(shape),
        "quant_constants": quant_constant_bytes(shape, s.double_quant, compute),
        "unquantized_params": unquantized_param_bytes(shape, compute),
        "lora_params": lora_param_bytes(lora_tensors, targets, s),
        "lora_grads": live_gradient_bytes(grads, peak.activations + peak.logits, shape.layers),
        # Paged state lives in CUDA managed memory, outside the allocator and outside nvidia-smi's per-process
        # figure (measured: the rank-64 runs, whose state is all paged, show the same nvidia-smi minus reserved
        # gap as the rank-8 ones). It is reported as paged_optimizer_gib instead.
        "optimizer_states": optimizer_bytes - paged,
        "activations": peak.activations,
        "logits": peak.logits,
        **method_memory.method_terms(shape, targets, policy, peak),
    }
    breakdown, offloaded = per_gpu(breakdown, shape, s, grads)
    breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
    breakdown["allocator_overhead"] = allocator_overhead_bytes(shape, policy, grads)
    notes = unmeasured_notes(s)
    if s.strategy == "fsdp" and s.optimizer.startswith("paged_"):
        paged //= s.num_gpus
    return Estimate(shape.name, breakdown, trainable, shape.total_params, s, paged_bytes=0 if s.cpu_offload else paged,
                    cpu_offload_bytes=offloaded, activation_offload_bytes=peak.offloaded, notes=notes)


def live_gradient_bytes(grads: int, activations: int, layers: int) -> int:
    """Adapter gradients alive at the peak. The trainer frees them after each optimizer step (zero_grad sets them
    to None), and backward creates them layer by layer from the top: at the activation peak, in the top layer's
    backward, one layer's share exists. At the optimizer step all exist but the activations are gone; that phase
    counts only where it is higher, as its excess over the activations."""
    return max(grads // layers, grads - activations)


# Terms FSDP splits across processes (FULL_SHARD): each process keeps 1/N of every flat parameter, its gradient
# and its optimizer state. The quantization constants are not parameters (bitsandbytes keeps them in each
# module's quant_state), so every process holds all of them.
SHARDED_TERMS = ("base_weights", "unquantized_params", "lora_params", "lora_grads", "optimizer_states")


def per_gpu(breakdown: dict[str, int], shape: ModelShape, s: Settings, grads: int) -> tuple[dict[str, int], int]:
    """One GPU's share under the launch strategy; returns the terms and the bytes FSDP offloads to CPU RAM.

    DDP: every GPU holds the single-GPU terms, plus the reducer's gradient buckets, a flat copy of the trainable
    gradients it all-reduces. FSDP: the sharded terms divided by the GPU count, plus what is gathered whole while
    in use: the root unit (embeddings, lm_head, final norm), which stays unsharded from forward to backward, and
    two decoder layers (the one computing and the one prefetched).
    """
    terms = dict(breakdown)
    if s.strategy == "ddp":
        terms["ddp_grad_buckets"] = grads  # allocated whole when DDP wraps the model, kept for the run
        return terms, 0
    if s.strategy != "fsdp":
        return terms, 0
    n = max(1, s.num_gpus)
    # accelerate's FSDP mixed precision keeps the trainable adapters (and so their gradients) in fp32.
    # torch AdamW keeps its moments in the parameter's dtype, so they are fp32 too.
    upcast = dict.fromkeys(["lora_params", "lora_grads"] + (["optimizer_states"] if s.optimizer == "adamw_torch" else []),
                           4 / DTYPE_BYTES[s.lora_dtype])
    offloaded = 0
    for key in SHARDED_TERMS:
        share = math.ceil(breakdown[key] * upcast.get(key, 1) / n)
        terms[key] = 0 if s.cpu_offload else share
        offloaded += share if s.cpu_offload else 0
    one_layer = (breakdown["base_weights"] + breakdown["lora_params"]) / shape.layers
    terms["fsdp_gathered"] = int(breakdown["unquantized_params"] + 2 * one_layer)
    return terms, offloaded


def base_weight_bytes(shape: ModelShape) -> int:
    """Packed 4-bit values: two per byte (quantize_4bit's output, uint8 storage)."""
    return sum(math.ceil(l.numel / 2) for l in shape.quantized)


def quant_constant_bytes(shape: ModelShape, double_quant: bool, compute_bytes: int) -> int:
    """One absmax per 64 values: fp32, or with double quantization uint8 plus one fp32 per 256 absmax.
    Linear-layer biases stay in the compute dtype and are counted with them."""
    total = 0
    for layer in shape.quantized:
        blocks = math.ceil(layer.numel / NF4_BLOCK)
        if double_quant:
            total += blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NESTED_OFFSET_BYTES
        else:
            total += 4 * blocks
        total += CODE_TABLE_BYTES
        total += compute_bytes * layer.out_features if layer.has_bias else 0
    return total


def unquantized_param_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Embeddings, lm_head (once if tied), norms, and unquantized linear layers, all loaded in the compute dtype:
    we skip `prepare_model_for_kbit_training`, which would make them fp32."""
    unquantized_linears = sum(l.numel + (l.out_features if l.has_bias else 0) for l in shape.linears if not l.quantized)
    if shape.tied_embeddings:  # the tied lm_head is the embedding matrix, already in other_params
        unquantized_linears -= sum(l.numel for l in shape.linears if not l.quantized and l.name.endswith("lm_head"))
    return compute_bytes * (shape.other_params + unquantized_linears)


def _lora_tensor_sizes(targets: list[Linear], s: Settings) -> list[int]:
    """Element counts of every trainable tensor: A (r x in) and B (out x r) per target, DoRA's magnitude (out)."""
    sizes = []
    for layer in targets:
        sizes += [s.rank * layer.in_features, layer.out_features * s.rank]
        if s.use_dora:
            sizes.append(layer.out_features)
    return sizes


def lora_param_bytes(sizes: list[int], targets: list[Linear], s: Settings) -> int:
    """A and B in the adapter dtype; the DoRA magnitude stays fp32 (TRL does not cast it)."""
    magnitude = sum(l.out_features for l in targets) if s.use_dora else 0
    return DTYPE_BYTES[s.lora_dtype] * (sum(sizes) - magnitude) + 4 * magnitude


def optimizer_state_bytes(sizes: list[int], optimizer: str, param_bytes: int) -> tuple[int, int]:
    """AdamW's two moments. bitsandbytes 8-bit: one byte each plus an fp32 absmax per 256 values, but 32-bit
    state for tensors under 4096 values. 32-bit bnb: 8 bytes/param. torch AdamW: the parameter's dtype.
    Returns (bytes, of which paged): paged optimizers put tensors of 100k+ values in CUDA managed memory."""
    total = paged = 0
    for n in sizes:
        if optimizer in ("paged_adamw_8bit", "adamw_bnb_8bit") and n >= MIN_8BIT_SIZE:
            size = 2 * n + 2 * 4 * math.ceil(n / OPTIMIZER_BLOCK)
        elif optimizer == "adamw_torch":
            size = 2 * param_bytes * n
        else:
            size = 8 * n
        total += size
        if optimizer.startswith("paged_") and n >= MIN_PAGED_SIZE:
            paged += 2 * n * (1 if "8bit" in optimizer else 4)
    return total, paged
