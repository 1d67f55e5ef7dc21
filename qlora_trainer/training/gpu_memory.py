"""This process's GPU memory as nvidia-smi shows it, and its peak over a run.

nvidia-smi's per-process figure (NVML's usedGpuMemory, read here through nvidia-ml-py, the library nvidia-smi
itself uses) is what a user sees and what the estimate predicts. It counts PyTorch's reserved memory plus what the
process holds outside the allocator: the CUDA context, kernel images loaded as they are first used, library
handles. It does not count CUDA managed memory (bitsandbytes' paged optimizer state), and neither does torch.

NVML gives the current figure, not a peak. The peak is assembled from two monotone parts:
- torch.cuda.max_memory_reserved(): the allocator's exact peak (reserved memory is only returned to the driver by
  empty_cache, which training does not call);
- the largest gap seen between NVML's figure and torch's reserved memory at the same moment. That gap grows in
  steps (a kernel module loaded on first use) and does not shrink, so sampling it now and then finds it.
A light thread samples both every SAMPLE_SECONDS during training, and every log and the end of training sample
too. The peak is the larger of that sum and the largest figure NVML itself reported.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from qlora_trainer.estimate.memory import GIB

SAMPLE_SECONDS = 0.2


@dataclass
class PeakTracker:
    """The peak arithmetic, free of any GPU: feed it (NVML's figure, torch's reserved) pairs."""

    largest_seen: int = 0  # the largest figure NVML reported
    largest_gap: int = 0  # the largest NVML-minus-reserved gap: memory outside the allocator
    samples: int = 0

    def observe(self, process_bytes: int, reserved_bytes: int) -> None:
        self.samples += 1
        self.largest_seen = max(self.largest_seen, process_bytes)
        self.largest_gap = max(self.largest_gap, process_bytes - reserved_bytes)

    def peak(self, peak_reserved_bytes: int) -> int | None:
        """What nvidia-smi showed at the peak; None before any NVML sample."""
        if not self.samples:
            return None
        return max(self.largest_seen, peak_reserved_bytes + self.largest_gap)


class ProcessMemory:
    """NVML's reading of this process on the current CUDA device; `reason` says why there is none."""

    def __init__(self):
        import torch

        self.device = torch.cuda.current_device()
        self.reason: str | None = None
        self._handle = None
        try:
            import pynvml
        except ImportError as err:
            self.reason = f"nvidia-ml-py is not installed ({err}); pip install nvidia-ml-py"
            return
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            # NVML's device order can differ from CUDA's (CUDA_VISIBLE_DEVICES): match the device by UUID.
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(self.device).uuid}")
        except pynvml.NVMLError as err:
            self.reason = f"NVML unavailable ({err})"

    def used_bytes(self) -> int | None:
        """This process's memory on the device as nvidia-smi lists it, or None (reason set) where NVML cannot say:
        a PID namespace hiding the process, MIG or a driver without per-process accounting."""
        if self._handle is None:
            return None
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError as err:
            self.reason = f"NVML process query failed ({err})"
            return None
        mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory is not None]
        if not mine:
            self.reason = "NVML lists no memory for this process id (container PID namespace or MIG)"
            return None
        self.reason = None
        return int(mine[0])


@dataclass
class MemorySampler:
    """Samples NVML and the allocator on a daemon thread between start() and stop()."""

    process: ProcessMemory
    tracker: PeakTracker = field(default_factory=PeakTracker)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> None:
        import torch

        used = self.process.used_bytes()
        if used is not None:
            with self._lock:
                self.tracker.observe(used, torch.cuda.memory_reserved(self.process.device))

    def start(self) -> None:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-memory-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def snapshot(self) -> dict:
        """Peak figures so far, in GiB: nvidia-smi's (None without NVML), torch's reserved and allocated."""
        import torch

        reserved = torch.cuda.max_memory_reserved(self.process.device)
        with self._lock:
            peak = self.tracker.peak(reserved)
            gap = self.tracker.largest_gap if self.tracker.samples else None
        return {"nvidia_smi": _gib(peak), "peak_reserved": _gib(reserved),
                "peak_allocated": _gib(torch.cuda.max_memory_allocated(self.process.device)), "non_allocator": _gib(gap)}


def context_bytes() -> int:
    """GPU memory in use outside PyTorch's allocator before loading: this process's CUDA context (and, on a shared
    GPU, other processes' memory, which is why the run's figure comes from NVML's per-process reading instead)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return max(0, total - free - torch.cuda.memory_reserved())


def peak_memory_report(estimated_bytes: int, sampler: MemorySampler | None, start_context: int | None) -> dict:
    """summary.json's peak_memory_gib for this process (see report_from_snapshot); on CPU only the estimate."""
    if sampler is None:
        return {"estimated": _gib(estimated_bytes), "measured": None}
    return report_from_snapshot(estimated_bytes, sampler.snapshot(), start_context, sampler.process.reason)


def report_from_snapshot(estimated_bytes: int, snap: dict, start_context: int | None, nvml_reason: str | None) -> dict:
    """The estimate next to what nvidia-smi showed (NVML), with the allocator's figures; error_percent is against
    NVML's figure. Without NVML (say, under MIG) `measured` is the allocator's peak plus the context at start and
    `measured_by` says so: that reads low by what loads later (0.23 GiB on the H100 runs)."""
    memory = {"estimated": _gib(estimated_bytes), "peak_reserved": snap["peak_reserved"],
              "peak_allocated": snap["peak_allocated"], "non_allocator": snap["non_allocator"],
              "cuda_context_at_start": _gib(start_context)}
    if snap["nvidia_smi"] is not None:
        memory.update(measured=snap["nvidia_smi"], measured_by="nvml")
    else:
        memory.update(measured=round(snap["peak_reserved"] + (_gib(start_context) or 0.0), 3),
                      measured_by=f"allocator + context at start ({nvml_reason})")
    memory["error_percent"] = round(100 * (memory["estimated"] - memory["measured"]) / memory["measured"], 2)
    return memory


def _gib(value: int | None) -> float | None:
    return None if value is None else round(value / GIB, 3)
