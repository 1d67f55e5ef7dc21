"""Exact-match accuracy: greedily complete held-out prompts and compare with the reference completions.

For classification-style data (the demo labels tweets) this is the number a user cares about; the loss alone
does not say whether the model now answers right.
"""

from __future__ import annotations

import torch

from qlora_trainer import distributed
from qlora_trainer.config.recipe import Recipe
from qlora_trainer.distributed import Launch


@torch.no_grad()
def exact_match_accuracy(model, tokenizer, rows, max_samples: int, max_new_tokens: int, batch_size: int = 50) -> dict:
    """Share of `rows` (prompt/completion) whose greedy completion equals the reference, whitespace-stripped."""
    rows = rows.select(range(min(max_samples, len(rows))))
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    correct, examples = 0, []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            answers = _complete(model, tokenizer, batch["prompt"], max_new_tokens)
            for prompt, answer, reference in zip(batch["prompt"], answers, batch["completion"]):
                hit = answer.strip() == reference.strip()
                correct += hit
                if len(examples) < 3:
                    examples.append({"prompt": prompt, "answer": answer.strip(), "reference": reference.strip(), "correct": hit})
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return {"accuracy": correct / len(rows) if len(rows) else 0.0, "correct": correct, "total": len(rows), "examples": examples}


def _complete(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def eval_share(recipe: Recipe, data, launch: Launch):
    """This process's part of the first eval.max_samples eval rows, which every held-out check scores."""
    rows = data.eval.select(range(min(recipe.eval.max_samples, len(data.eval))))
    return rows.shard(num_shards=launch.world_size, index=launch.rank, contiguous=True)


def held_out_exact_match(recipe: Recipe, trainer, tokenizer, data, launch: Launch, when: str) -> dict | None:
    """Exact match on the eval prompts, each process completing its share of them."""
    if not recipe.eval.exact_match:
        return None
    if launch.strategy == "fsdp":  # each process holds a shard of the model: generating would gather it whole
        print(f"Held-out exact match {when}: skipped under FSDP; run `generate` on the adapter instead", flush=True)
        return None
    share = eval_share(recipe, data, launch)
    parts = distributed.gather(
        exact_match_accuracy(trainer.peft_model, tokenizer, share, len(share), recipe.eval.max_new_tokens), launch)
    result = combine_exact_match(parts)
    print(f"Held-out exact match {when}: {result['accuracy']:.1%} ({result['correct']}/{result['total']})", flush=True)
    return result


def combine_exact_match(parts: list[dict]) -> dict:
    correct, total = sum(p["correct"] for p in parts), sum(p["total"] for p in parts)
    examples = [e for p in parts for e in p["examples"]][:3]
    return {"accuracy": correct / total, "correct": correct, "total": total, "examples": examples}
