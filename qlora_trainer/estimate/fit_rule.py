"""The one rule for "fits": the planner, `estimate --fit`, the fit line of every estimate and the stop before
loading weights all apply it, so that no two of them can disagree about the same run.

A run fits when its predicted peak is within the budget less a safety margin. The estimator is held to +5% / -3%
of nvidia-smi (docs/memory.md), so keeping 5% free keeps a run that the estimate under-predicts inside the card.
"""

from __future__ import annotations

SAFETY_MARGIN = 0.05


def usable_gib(budget_gib: float) -> float:
    """The part of a budget a run may be planned to use."""
    return budget_gib * (1 - SAFETY_MARGIN)


def fits(predicted_gib: float, budget_gib: float) -> bool:
    return predicted_gib <= usable_gib(budget_gib)


def headroom_gib(predicted_gib: float, budget_gib: float) -> float:
    """What is left below the usable part of the budget (negative: by how much it does not fit)."""
    return usable_gib(budget_gib) - predicted_gib


def verdict(predicted_gib: float, budget_gib: float) -> str:
    """The fit line's words: "fits (headroom +1.20 GiB within 95% of 24 GiB)"."""
    word = "fits" if fits(predicted_gib, budget_gib) else "does NOT fit"
    return (f"{word} (headroom {headroom_gib(predicted_gib, budget_gib):+.2f} GiB within "
            f"{1 - SAFETY_MARGIN:.0%} of {budget_gib:g} GiB, the margin for the estimate's error)")
