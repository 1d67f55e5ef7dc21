"""The estimate held to GPU measurements: every configuration measured on an H100 (benchmarks/vram/README.md says
where each figure comes from) within +5% / -3% of what nvidia-smi showed for the process."""

from __future__ import annotations

import json
from functools import cache

import pytest
from helpers import REPO

from qlora_trainer.estimate.estimate_output import estimate_json
from qlora_trainer.estimate.memory import CUDA_CONTEXT_BYTES, GIB, Settings, estimate
from qlora_trainer.estimate.shape_lookup import shape_for_model

MEASURED = REPO / "benchmarks" / "vram"
FILES = ("h100-2026-11-22.jsonl", "h100-levers-2026-11-22.jsonl")
OVER, UNDER = 5.0, -3.0  # percent; over-prediction is the safer side


def rows() -> list[dict]:
    return [json.loads(line) for name in FILES for line in (MEASURED / name).read_text().splitlines() if line.strip()]


@cache
def shape(arch: str):
    return shape_for_model(arch)


def settings(row: dict) -> Settings:
    """The measured runs' recipe: alpha 2r, dropout 0.05, all-linear, paged_adamw_8bit, sdpa, unless the row says."""
    return Settings(rank=row["rank"], seq_len=row["seq_len"], batch_size=row["batch_size"],
                    gradient_checkpointing=row["checkpointing"], lora_dropout=row.get("lora_dropout", 0.05),
                    activation_offloading=row.get("activation_offloading", False), kernels=row.get("kernels", "none"))


def label(row: dict) -> str:
    levers = [k for k in ("activation_offloading", "kernels", "lora_dropout") if k in row]
    return (f"{row['arch']}-r{row['rank']}-s{row['seq_len']}-mb{row['batch_size']}"
            f"{'' if row['checkpointing'] else '-nockpt'}" + "".join(f"-{k}={row[k]}" for k in levers))


@pytest.mark.parametrize("row", rows(), ids=label)
def test_estimate_is_within_the_target_of_nvidia_smi(row):
    predicted = estimate(shape(row["arch"]), settings(row)).total / GIB
    error = 100 * (predicted - row["nvidia_smi_gib"]) / row["nvidia_smi_gib"]
    assert UNDER <= error <= OVER, f"{predicted:.3f} GiB predicted vs {row['nvidia_smi_gib']} measured ({error:+.1f}%)"


@pytest.mark.parametrize("row", [r for r in rows() if "torch_peak_reserved_gib" in r], ids=label)
def test_allocator_share_is_within_the_target_of_torch_reserved(row):
    """What a memory cap (set_per_process_memory_fraction) limits: the allocator's part of the estimate."""
    est = estimate(shape(row["arch"]), settings(row))
    allocator = estimate_json(est)["allocator_gib"]
    assert allocator == pytest.approx((est.total - CUDA_CONTEXT_BYTES) / GIB, abs=0.001)
    error = 100 * (allocator - row["torch_peak_reserved_gib"]) / row["nvidia_smi_gib"]
    assert UNDER <= error <= OVER, f"{allocator:.3f} GiB vs {row['torch_peak_reserved_gib']} reserved"


def test_the_context_term_is_the_measured_gap():
    """nvidia-smi minus torch's peak reserved was the same in every configuration: that is cuda_context."""
    gaps = [r["nvidia_smi_gib"] - r["torch_peak_reserved_gib"] for r in rows() if "torch_peak_reserved_gib" in r]
    assert len(gaps) == 14 and max(gaps) - min(gaps) < 0.02
    assert CUDA_CONTEXT_BYTES / GIB == pytest.approx(max(gaps), abs=0.005)
