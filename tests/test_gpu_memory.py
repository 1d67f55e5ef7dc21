"""The run's measured peak: what nvidia-smi would show, assembled from NVML samples and the allocator's peak.
The arithmetic runs without a GPU; reading NVML itself needs one (tools/measure_vram.py uses the same code)."""

from __future__ import annotations

import pytest

from qlora_trainer.training.gpu_memory import GIB, PeakTracker, report_from_snapshot


def test_peak_is_the_allocator_peak_plus_the_largest_gap():
    tracker = PeakTracker()
    assert tracker.peak(5 * GIB) is None, "no NVML sample, no nvidia-smi figure"
    tracker.observe(process_bytes=int(1.0 * GIB), reserved_bytes=int(0.49 * GIB))  # context only, at start
    tracker.observe(process_bytes=int(4.7 * GIB), reserved_bytes=int(4.0 * GIB))  # kernels loaded since: gap 0.70
    tracker.observe(process_bytes=int(3.0 * GIB), reserved_bytes=int(2.26 * GIB))  # gap 0.74, between peaks
    # The sampler missed the allocator's peak (5.18 GiB reserved); the gap it found is added to it.
    assert tracker.peak(int(5.18 * GIB)) / GIB == pytest.approx(5.92, abs=0.001)
    assert tracker.largest_gap / GIB == pytest.approx(0.74, abs=0.001)


def test_a_sample_at_the_peak_counts_as_is():
    tracker = PeakTracker()
    tracker.observe(process_bytes=int(6.0 * GIB), reserved_bytes=int(5.5 * GIB))
    tracker.observe(process_bytes=int(2.0 * GIB), reserved_bytes=int(1.0 * GIB))  # a gap larger than at the peak
    assert tracker.peak(int(5.5 * GIB)) == int(6.5 * GIB), "the largest gap is kept: it does not shrink in a run"
    tracker.observe(process_bytes=int(9.0 * GIB), reserved_bytes=int(5.5 * GIB))
    assert tracker.peak(int(5.5 * GIB)) == int(9.0 * GIB)


def test_report_errors_against_nvml_and_names_a_fallback():
    snap = {"nvidia_smi": 5.93, "peak_reserved": 5.184, "peak_allocated": 4.888, "non_allocator": 0.746}
    report = report_from_snapshot(int(5.892 * GIB), snap, int(0.51 * GIB), None)
    assert report["measured"] == 5.93 and report["measured_by"] == "nvml"
    assert report["error_percent"] == pytest.approx(100 * (5.892 - 5.93) / 5.93, abs=0.01)
    assert report["peak_reserved"] == 5.184 and report["peak_allocated"] == 4.888
    blind = report_from_snapshot(int(5.892 * GIB), dict(snap, nvidia_smi=None), int(0.51 * GIB), "MIG")
    assert blind["measured"] == pytest.approx(5.694) and blind["measured_by"] == "allocator + context at start (MIG)"
