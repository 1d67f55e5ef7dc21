"""The estimator's activation and loss-head terms: what autograd keeps alive for backward at the peak of a step.

Each per-token figure below is what the installed libraries save, read from their code and counted on CPU with
`torch.autograd.graph.saved_tensors_hooks` on a tiny 4-bit model through the trainer's own path
(tests/test_activation_memory.py holds the counts): transformers' Llama/Qwen2/Gemma-2 decoder layers, PEFT's
LoRA layer over bitsandbytes' 4-bit matmul, TRL 1.16's fused LM head, liger-kernel 0.8.5's RMSNorm and SwiGLU.
Sizes are bytes; `a` is the compute dtype's width.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_trainer.estimate.types import Linear, ModelShape, Settings

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# TRL's fused LM head scores tokens in tiles of 4096 tokens x 32768 vocabulary entries (chunked_logprob.py).
LOGPROB_TOKEN_TILE = 4096
LOGPROB_VOCAB_TILE = 32768
# Per scored token the fused head keeps seven fp32 running statistics (max, sums, log-z, target logit, ...).
LOGPROB_STATS_PER_TOKEN = 7 * 4
# A dropout mask on CUDA is bool (at::native_dropout): one byte per element beside the dropped-out copy.
DROPOUT_MASK_BYTES = 1
# cuBLAS's workspace on Hopper (32 MiB, NVIDIA's recommendation, which PyTorch follows), taken from PyTorch's
# allocator on the first matmul of the compute stream.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
# Output projections read an activation the block made itself (attention output, gated product), not the norm.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "dense", "out_proj", "fc2", "wo", "w2", "c_proj", "dense_4h_to_h")
# Attention implementations whose kernel saves its own output (flash / memory-efficient SDPA, flash-attn).
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class Activations:
    """Where the step peaks and what is alive then, in bytes."""

    activations: int  # saved tensors of the decoder layers plus the backward's working tensors, at the peak
    logits: int  # what the loss head adds on top at that moment (0 when the peak is in a decoder layer's backward)
    offloaded: int  # bytes activation offloading keeps in pinned CPU memory instead (not on the GPU)


def tokens_per_micro_batch(s: Settings) -> int:
    """Worst case: every row full. Packing and padding-free concatenate the rows; the token count is the same."""
    return s.batch_size * s.seq_len


def attention_mask_bytes(s: Settings) -> int:
    """The 4-D mask transformers builds once per forward, shared by every layer (masking_utils). SDPA on full,
    unpadded rows gets none (it runs with is_causal); eager always gets (batch, 1, seq, seq) in the compute dtype;
    a padding-free row of all the micro-batch's tokens gets (1, 1, tokens, tokens), block-diagonal from
    position_ids, bool for SDPA. Flash attention takes cu_seqlens instead. A padded micro-batch would add a bool
    (batch, 1, seq, seq) mask under SDPA too; the estimate's worst case is full rows, which have more tokens."""
    if s.attn_implementation.startswith("flash"):
        return 0
    if s.padding_free or s.packing:
        width = 1 if s.attn_implementation == "sdpa" else _a(s)
        return width * tokens_per_micro_batch(s) ** 2
    return _a(s) * s.batch_size * s.seq_len**2 if s.attn_implementation == "eager" else 0


def attention_matrix_bytes(shape: ModelShape, s: Settings) -> int:
    """Eager attention keeps the fp32 softmax output and its compute-dtype copy that multiplies V (and, with
    soft-capping, the tanh output) for every head over every (query, key) pair of a row: (batch, heads, seq, seq),
    or (1, heads, tokens, tokens) for a padding-free row of all the micro-batch's tokens. SDPA and flash keep only
    a per-head log-sum-exp."""
    if s.attn_implementation != "eager":
        return 0
    pairs = tokens_per_micro_batch(s) ** 2 if (s.padding_free or s.packing) else s.batch_size * s.seq_len**2
    return (4 + _a(s) * (2 if shape.attn_softcapping else 1)) * shape.heads * pairs


def layer_saved_bytes_per_token(shape: ModelShape, targets: list[Linear], s: Settings) -> float:
    """What one decoder layer's forward saves for backward, per token.

    Norms: HF RMSNorm saves its fp32 input copy (4h) and an fp32 rsqrt per row; liger's saves the input as is.
    Attention: q and k after RoPE and v (SDPA keeps the key/value heads, expanded to all heads when a mask makes
    transformers call repeat_kv), the output and an fp32 log-sum-exp per head. Gated MLP: gate (for the
    activation's backward), up and act(gate) (for the product's); liger's SwiGLU/GeGLU recomputes act(gate).
    bitsandbytes' MatMul4Bit saves only the packed weight, so the base layers add nothing; LoRA adds its inputs.
    """
    a = _a(s)
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    liger = s.kernels == "liger"
    norms = shape.norms_per_layer * ((a if liger else 4) * h + 4)
    expanded = s.attn_implementation == "eager" or attention_mask_bytes(s) > 0
    attention = a * (q + 2 * (q if expanded else kv)) + 4 * shape.heads
    attention += a * q if s.attn_implementation in FUSED_ATTENTION else 0
    mlp = (2 if liger else 3) * a * i
    return norms + attention + mlp + lora_saved_bytes_per_token(shape, targets, s)


def lora_saved_bytes_per_token(shape: ModelShape, targets: list[Linear], s: Settings) -> float:
    """One layer's share of what the LoRA branches save: lora_A's input and lora_B's rank-r input per target.

    With dropout each target has its own dropped-out copy of its input plus the bool mask. Without, the targets
    reading one tensor share it: q/k/v (and gate/up) read the norm output, saved once per block; the attention
    output projection reads the attention output, already saved by SDPA (eager hands it a fresh contiguous copy);
    the MLP's down projection reads the gated product, which only LoRA saves.
    """
    a = _a(s)
    per_layer = len(targets) / shape.layers
    low_rank = a * s.rank * per_layer
    if s.lora_dropout > 0:
        return low_rank + sum((a + DROPOUT_MASK_BYTES) * t.in_features for t in targets) / shape.layers
    outputs = [t for t in targets if t.name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS]
    inputs = [t for t in targets if t not in outputs]
    mlp_inputs = {t.name.rsplit(".", 1)[0] for t in inputs if t.out_features in (shape.intermediate, 2 * shape.intermediate)}
    attention_inputs = {t.name.rsplit(".", 1)[0] for t in inputs} - mlp_inputs
    shared = a * shape.hidden * (len(mlp_inputs) + len(attention_inputs))  # one normed input per block and layer
    fresh = 0
    for t in outputs:
        if t.in_features == shape.intermediate:
            fresh += a * t.in_features
        elif s.attn_implementation not in FUSED_ATTENTION:
            fresh += a * t.in_features
    return low_rank + (shared + fresh) / shape.layers


def backward_working_bytes_per_token(shape: ModelShape, s: Settings) -> float:
    """Gradients alive inside one layer's backward at its worst point, the down projection's: the gradient
    arriving from above (h) and its input gradient from the 4-bit base and from LoRA before they are summed (2i).
    After it the down projection's saved inputs are freed, which makes room for the product's two gradients."""
    return _a(s) * (shape.hidden + 2 * shape.intermediate)


def dequantized_weight_bytes(shape: ModelShape, s: Settings) -> int:
    """bitsandbytes dequantizes a 4-bit weight to the compute dtype for each matmul (forward past 1536 tokens and
    every backward), with its absmax expanded to fp32: one such weight, the largest, at a time."""
    largest = max((l.numel for l in shape.quantized), default=0)
    return _a(s) * largest + 4 * -(-largest // 64)


def head_bytes(shape: ModelShape, s: Settings) -> int:
    """The loss head while it runs: TRL 1.16's fused LM head never builds batch x seq x vocab logits.

    Forward: the final norm's saved input, the last hidden state, its masked copy that the head saves, one
    4096 x 32768 tile of logits and seven fp32 statistics per token. Backward adds the fp32 hidden-state gradient
    it accumulates, and its cast to the compute dtype.
    """
    tokens, a, h = tokens_per_micro_batch(s), _a(s), shape.hidden
    liger = s.kernels == "liger"
    tile = min(tokens, LOGPROB_TOKEN_TILE) * min(shape.vocab, LOGPROB_VOCAB_TILE) * a
    saved = ((a if liger else 4) * h + 2 * a * h + LOGPROB_STATS_PER_TOKEN) * tokens
    return saved + tile + (4 + a) * h * tokens


def activation_peak(shape: ModelShape, targets: list[Linear], s: Settings) -> Activations:
    """The larger of the two peaks of a step: the loss head's, and the backward of the top decoder layer.

    With non-reentrant checkpointing each layer keeps only its input and the top layer is recomputed in full in
    backward; without it every layer keeps all it saved. TRL's activation offloading moves every saved tensor of
    1 KiB or more to pinned CPU memory in forward and brings one back as backward needs it: the layer inputs under
    checkpointing (the top one comes back for its recompute), everything but one layer's tensors without it.
    """
    tokens = tokens_per_micro_batch(s)
    layer = layer_saved_bytes_per_token(shape, targets, s) * tokens + attention_matrix_bytes(shape, s)
    below, offloaded, kept_per_layer = kept_bytes(shape, targets, s)
    top_layer = layer if s.gradient_checkpointing else 0  # recomputed on top of what is kept
    working = CUBLAS_WORKSPACE_BYTES + dequantized_weight_bytes(shape, s)
    in_layer = below + top_layer + backward_working_bytes_per_token(shape, s) * tokens + working
    # The head runs after the layers: what they keep is alive, but not the recomputation.
    in_head = below + head_bytes(shape, s) + CUBLAS_WORKSPACE_BYTES
    if s.activation_offloading:
        in_head -= kept_per_layer  # the top layer's saved tensors are offloaded until its backward
    return Activations(activations=int(in_layer), logits=int(max(0, in_head - in_layer)), offloaded=int(offloaded))


def kept_bytes(shape: ModelShape, targets: list[Linear], s: Settings) -> tuple[int, int, int]:
    """What the decoder layers keep from forward to backward: (on the GPU, in pinned CPU RAM under activation
    offloading, per layer). Under checkpointing each layer keeps its input; without, everything it saved."""
    tokens = tokens_per_micro_batch(s)
    layer = layer_saved_bytes_per_token(shape, targets, s) * tokens + attention_matrix_bytes(shape, s)
    kept_per_layer = _a(s) * shape.hidden * tokens if s.gradient_checkpointing else layer
    resident_layers = 1 if s.activation_offloading else shape.layers
    offloaded = (shape.layers - resident_layers) * kept_per_layer
    return resident_layers * kept_per_layer + attention_mask_bytes(s), offloaded, kept_per_layer


def _a(s: Settings) -> int:
    return DTYPE_BYTES[s.compute_dtype]
