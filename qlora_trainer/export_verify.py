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


def verification_prompts(source) -> list[str]:
    """Prompts from the run's eval data when there is one (the text the model was trained to handle)."""
    recipe = source.recipe
    if recipe is None or not recipe.data.eval_path:
        return []
    from qlora_trainer.data import load_data

    data = load_data(recipe.data, recipe.train.seed)
    rows = data.eval.select(range(min(MAX_PROMPTS, len(data.eval))))
    column = next((c for c in ("prompt", "text") if c in rows.column_names), None)
    return [row[column] for row in rows] if column else []


@torch.no_grad()
def compare_logits(reference, candidate, tokenizer, prompts: list[str]) -> dict:
    """Top-1 agreement and relative L2 error of the candidate's logits against the reference's, over all tokens."""
    agree = total = 0
    error_sq = norm_sq = 0.0
    reference.eval()
    candidate.eval()
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ref = reference(input_ids=ids.to(reference.device)).logits.float().cpu()
        cand = candidate(input_ids=ids.to(candidate.device)).logits.float().cpu()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        total += ids.numel()
        error_sq += (ref - cand).pow(2).sum().item()
        norm_sq += ref.pow(2).sum().item()
    return {"top1_agreement": agree / total, "relative_logit_error": (error_sq / norm_sq) ** 0.5, "tokens": total}
