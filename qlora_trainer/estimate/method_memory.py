"""What each training method (train.method) changes in a step's memory, from what TRL 1.16's trainers run (read
in dpo_trainer.py, kto_trainer.py and experimental/orpo/orpo_trainer.py; not yet measured on a GPU):

- sft: one forward and backward over the micro-batch.
- dpo: each pair's chosen and rejected rows run as one batch of 2 x micro-batch rows with gradients. Then the
  reference (the base with the adapter disabled, or a continued adapter's frozen copy) runs over the same rows
  without gradients, while everything the policy's forward saved for backward is alive.
- orpo: 2 x micro-batch rows with gradients and no reference, but TRL's ORPOTrainer builds the full logits
  (rows x seq_len x vocab) and the log-softmax of the chosen half, where the others use TRL's fused LM head.
- kto: the micro-batch with gradients. Before it the policy scores the KL batch (each prompt with another row's
  completion) without gradients, when nothing is saved yet; after it the reference scores the KL batch and then
  the micro-batch, each without gradients, with the policy's saved tensors alive.

The reference adds no weights: the adapter is switched off (or to its frozen copy) on the same 4-bit base.
"""

from __future__ import annotations

import dataclasses

from qlora_trainer.estimate.activation_memory import (
    CUBLAS_WORKSPACE_BYTES,
    DTYPE_BYTES,
    LOGPROB_STATS_PER_TOKEN,
    LOGPROB_TOKEN_TILE,
    LOGPROB_VOCAB_TILE,
    Activations,
    dequantized_weight_bytes,
    head_bytes,
    kept_bytes,
    tokens_per_micro_batch,
)
from qlora_trainer.estimate.types import Linear, ModelShape, Settings

PAIRED = ("dpo", "orpo")  # chosen and rejected run together
WITH_REFERENCE = ("dpo", "kto")


def min_micro_batch(method: str) -> int:
    """KTO's KL term pairs each row with another row of its micro-batch: TRL refuses a micro-batch of one."""
    return 2 if method == "kto" else 1


def policy_settings(s: Settings) -> Settings:
    """The settings of the forward with gradients: rows, not pairs, per micro-batch."""
    return dataclasses.replace(s, batch_size=s.batch_size * (2 if s.method in PAIRED else 1))


def method_terms(shape: ModelShape, targets: list[Linear], policy: Settings, peak: Activations) -> dict[str, int]:
    """The breakdown's terms that depend on the method: `logits` for ORPO's full logits (instead of the fused
    head's), and `reference_forward` for DPO and KTO. `policy` are the settings of the forward with gradients."""
    if policy.method == "orpo":
        return {"logits": full_logits_bytes(shape, policy)}
    if policy.method not in WITH_REFERENCE:
        return {}
    return {"reference_forward": reference_forward_bytes(shape, targets, policy, peak)}


def full_logits_bytes(shape: ModelShape, policy: Settings) -> int:
    """ORPO's loss head: the logits of every row (kept to the end of the loss), a contiguous copy of the chosen
    half's and its log-softmax (saved by cross_entropy), and in backward the gradient of the logits. The selected
    log-probabilities of both halves come from TRL's fused kernel on CUDA, which keeps no softmax."""
    per_row = policy.seq_len * shape.vocab * DTYPE_BYTES[policy.compute_dtype]
    rows = policy.batch_size
    return per_row * (rows + rows // 2 + rows // 2 + rows)


def reference_forward_bytes(shape: ModelShape, targets: list[Linear], policy: Settings, peak: Activations) -> int:
    """What the reference's forward adds above the step's own peak (0 where the backward peak is higher): what
    the layers keep for backward and the policy's loss head saved, plus one layer's forward working set without
    gradients (the residual, the normed input and the MLP's gate, up and activation: q/k/v are smaller) over the
    rows it scores at once (DPO: the policy's 2 x micro-batch; KTO: the KL batch, then the micro-batch, each as
    many rows as the policy's), and the fused head's tile."""
    kept, _, _ = kept_bytes(shape, targets, policy)
    tokens, a = tokens_per_micro_batch(policy), DTYPE_BYTES[policy.compute_dtype]
    layer = a * (2 * shape.hidden + 3 * shape.intermediate) * tokens
    head = min(tokens, LOGPROB_TOKEN_TILE) * min(shape.vocab, LOGPROB_VOCAB_TILE) * a + LOGPROB_STATS_PER_TOKEN * tokens
    working = CUBLAS_WORKSPACE_BYTES + dequantized_weight_bytes(shape, policy)
    at_reference = kept + head_bytes(shape, policy) + max(layer + working, head)
    return max(0, int(at_reference - peak.activations - peak.logits))
