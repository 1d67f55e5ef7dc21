"""Compare two models' next-token logits on held prompts: the check that an export reproduces training."""

from __future__ import annotations

import torch

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Q: What is the capital of France?\nA:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]
MAX_PROMPTS = 8

# The verification bars for the default method. The reference is the 4-bit model plus adapter, run with fp32
# arithmetic (`exact_reference`); the bars leave room for rounding, which grows with depth, and none for a wrong
# merge. Measured on CPU: the 2-layer demo export is 0.006 from its reference with 100% top-1 agreement; a random
# 24-layer Qwen2.5-0.5B with a random rank-16 adapter is 0.011 / 98%, and 0.0037 / 100% from an fp32 computation
# of the same merged function, so the remaining gap is the reference's own rounding in bitsandbytes' CPU matmul.
# Merging into the original 16-bit weights instead is 0.13 / 91% on the demo.
MIN_TOP1_AGREEMENT = 0.95
MAX_RELATIVE_LOGIT_ERROR = 0.05


def verification_prompts(source) -> list[str]:
    """Prompts from the run's eval data when there is one (the text the model was trained to handle)."""
    recipe = source.recipe
    if recipe is None or not recipe.data.eval_path:
        return []
    from qlora_trainer.dataset.data import load_data
    from qlora_trainer.errors import UserError

    try:
        data = load_data(recipe.data, recipe.train.seed, recipe.train.method)
    except UserError:  # the training data need not be on the machine that exports
        return []
    rows = data.eval.select(range(min(MAX_PROMPTS, len(data.eval))))
    column = next((c for c in ("prompt", "text") if c in rows.column_names), None)
    return [row[column] for row in rows if isinstance(row[column], str)] if column else []


@torch.no_grad()
def compare_logits(reference, candidate, tokenizer, prompts: list[str]) -> dict:
    """Top-1 agreement and relative L2 error of the candidate's logits against the reference's, over all tokens.

    `top1_agreement` counts only decisive positions, where the reference's best token leads the runner-up by more
    than 1% of its logits' spread: a near-tie flips under any 16-bit rounding and says nothing about the merge.
    """
    agree = decisive = total = 0
    raw_agree = 0
    error_sq = norm_sq = 0.0
    reference.eval()
    candidate.eval()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ref = reference(input_ids=ids.to(reference.device)).logits[0].float().cpu()
        cand = candidate(input_ids=ids.to(candidate.device)).logits[0].float().cpu()
        same = ref.argmax(-1) == cand.argmax(-1)
        top2 = ref.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.01 * ref.std(dim=-1)
        raw_agree += same.sum().item()
        agree += (same & clear).sum().item()
        decisive += clear.sum().item()
        total += ids.numel()
        error_sq += (ref - cand).pow(2).sum().item()
        norm_sq += ref.pow(2).sum().item()
    return {"top1_agreement": agree / decisive if decisive else 1.0, "top1_agreement_all_tokens": raw_agree / total,
            "decisive_tokens": decisive, "relative_logit_error": (error_sq / norm_sq) ** 0.5, "tokens": total}
