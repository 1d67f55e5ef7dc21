"""Held-out preference accuracy and reward margin, before and after a preference run: what the loss alone does not
say, whether the model now prefers the chosen answers it has never seen.

Accuracy is the share of held-out pairs whose chosen answer has a higher log-probability than the rejected one
(summed over the answer's tokens, as DPO sums them). The reward of an answer is beta x (its log-probability under
the trained model - under the reference); the margin is the chosen reward minus the rejected one, averaged. ORPO
has no reference, so its runs report the log-probability margin only. KTO's labelled rows (no pairs) report the
mean reward of desirable minus undesirable rows.
"""

from __future__ import annotations

import torch

from qlora_trainer import distributed
from qlora_trainer.config.recipe import Recipe
from qlora_trainer.dataset.sequence_fit import completion_ids
from qlora_trainer.distributed import Launch
from qlora_trainer.training.exact_match import eval_share


def held_out_preference(recipe: Recipe, trainer, tokenizer, data, launch: Launch, when: str) -> dict | None:
    """Score the eval rows (each process its share), print one line, return the numbers for summary.json."""
    if recipe.train.method == "sft" or data.eval is None:
        return None
    if launch.strategy == "fsdp":  # each process holds a shard of the model: scoring would gather it whole
        print(f"Held-out preference accuracy {when}: skipped under FSDP", flush=True)
        return None
    share = eval_share(recipe, data, launch)
    beta = None if recipe.train.method == "orpo" else getattr(recipe, recipe.train.method).beta
    sums = score(trainer.peft_model, tokenizer, share.to_list(), recipe.train.seq_len, beta,
                 batch_size=max(2, recipe.train.micro_batch_size))
    result = combine(distributed.gather(sums, launch))
    print(f"Held-out preference {when}: {describe(result)}", flush=True)
    return result


@torch.no_grad()
def score(model, tokenizer, rows: list[dict], seq_len: int, beta: float | None, batch_size: int) -> dict:
    """Sums over `rows` (pairs or labelled rows) of what `combine` turns into accuracy and margins."""
    answers = ("chosen", "rejected") if "chosen" in rows[0] else ("completion",)
    items = [completion_ids(row["prompt"], row[answer], tokenizer) for row in rows for answer in answers]
    policy = _logps(model, tokenizer, items, seq_len, batch_size)
    reference = None
    if beta is not None:
        from trl.trainer.utils import use_adapter

        # DPO and KTO keep a continued adapter's starting copy as "ref"; a new adapter's reference is the base.
        with use_adapter(model, "ref" if "ref" in model.peft_config else None):
            reference = _logps(model, tokenizer, items, seq_len, batch_size)
    if len(answers) == 2:
        chosen, rejected = policy[0::2], policy[1::2]
        sums = {"pairs": len(rows), "correct": int((chosen > rejected).sum()), "logp_margin": float((chosen - rejected).sum())}
        if reference is not None:
            ratios = policy - reference
            sums["reward_margin"] = float(beta * (ratios[0::2] - ratios[1::2]).sum())
        return sums
    labels = torch.tensor([row["label"] for row in rows])
    rewards = beta * (policy - reference)
    return {"desirable": int(labels.sum()), "undesirable": int((~labels).sum()),
            "desirable_reward": float(rewards[labels].sum()), "undesirable_reward": float(rewards[~labels].sum())}


def _logps(model, tokenizer, items: list[tuple[list[int], int]], seq_len: int, batch_size: int) -> torch.Tensor:
    """Summed log-probabilities of each item's answer tokens (ids cut at seq_len, as training cuts them)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([_batch_logps(model, tokenizer, items[i:i + batch_size], seq_len)
                          for i in range(0, len(items), batch_size)])
    finally:
        model.train(was_training)


def _batch_logps(model, tokenizer, items, seq_len: int) -> torch.Tensor:
    """One left-padded batch: every answer ends at the right edge, so only the last positions' logits are needed
    (logits_to_keep), not batch x seq x vocab of them."""
    ids = [full[:seq_len] for full, _ in items]
    starts = [min(max(start, 1), len(full)) for (_, start), full in zip(items, ids)]  # token 0 is never predicted
    width = max(len(i) for i in ids)
    keep = max(len(full) - start for full, start in zip(ids, starts)) + 1
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    device = model.device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                   position_ids=positions.to(device), logits_to_keep=keep, use_cache=False).logits.float()
    targets = input_ids[:, width - keep + 1:].to(device)
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    first = torch.tensor([width - len(full) + start for full, start in zip(ids, starts)], device=device)
    target_positions = torch.arange(width - keep + 1, width, device=device)
    mask = target_positions.unsqueeze(0) >= first.unsqueeze(1)
    return (logps * mask).sum(-1).cpu()


def combine(parts: list[dict]) -> dict:
    """The processes' sums as accuracy and mean margins."""
    total = {key: sum(p.get(key, 0) for p in parts) for key in parts[0]}
    if "pairs" in total:
        n = max(total["pairs"], 1)
        result = {"pairs": total["pairs"], "correct": total["correct"], "accuracy": total["correct"] / n,
                  "logp_margin": total["logp_margin"] / n}
        if "reward_margin" in total:
            result["reward_margin"] = total["reward_margin"] / n
        return result
    good, bad = max(total["desirable"], 1), max(total["undesirable"], 1)
    return {"rows": total["desirable"] + total["undesirable"], "accuracy": None,
            "reward_margin": total["desirable_reward"] / good - total["undesirable_reward"] / bad}


def describe(result: dict) -> str:
    parts = []
    if result["accuracy"] is not None:
        parts.append(f"accuracy {result['accuracy']:.1%} ({result['correct']}/{result['pairs']} pairs prefer chosen)")
    if "reward_margin" in result:
        parts.append(f"reward margin {result['reward_margin']:+.3f}")
    if "logp_margin" in result:
        parts.append(f"log-prob margin {result['logp_margin']:+.2f}")
    return ", ".join(parts)
