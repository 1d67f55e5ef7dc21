"""The GPU memory a run may use, and the cap that holds it there.

A budget is in nvidia-smi's terms: everything the process holds on the GPU, the CUDA context included, the
same terms as the estimate's total. A cap (train.gpu_memory_gib, --gpu-memory) limits PyTorch's caching
allocator to the cap less what lives outside it, so that an estimate that was too low shows up as a real
out-of-memory error at the cap, as it would on a card of that size.
"""

from __future__ import annotations

import psutil

from qlora_trainer.errors import UserError
from qlora_trainer.estimate.memory import CUDA_CONTEXT_BYTES
from qlora_trainer.estimate.types import GIB, Budget


def run_budget(cap_gib: float | None, cap_source: str, device: str) -> Budget:
    """The cap, else the GPU's free memory; without a GPU and a cap there is no budget."""
    import torch

    if device != "cuda":
        if cap_gib is not None:
            return Budget(cap_gib, cap_source, host_ram_gib())
        return Budget(None, "no GPU memory budget: the safe defaults; pass --gpu-memory GIB to plan for a GPU")
    free, _ = torch.cuda.mem_get_info()
    # The context already exists, so it is not in `free`; the estimate counts it, so the budget does too.
    available = (free + CUDA_CONTEXT_BYTES) / GIB
    if cap_gib is not None and cap_gib <= available:
        return Budget(cap_gib, cap_source, host_ram_gib())
    source = f"free memory on {torch.cuda.get_device_name()}"
    if cap_gib is not None:
        source += f", below the {cap_source} cap"
    return Budget(round(available, 3), source, host_ram_gib())


def host_ram_gib() -> float:
    """The CPU RAM available now, which offloaded activations would pin."""
    return psutil.virtual_memory().available / GIB


def apply_cap(cap_gib: float) -> None:
    """Limit this process's caching allocator so that the process as a whole stays within cap_gib."""
    import torch

    _, total = torch.cuda.mem_get_info()
    allocator = cap_gib * GIB - CUDA_CONTEXT_BYTES
    if allocator <= 0 or cap_gib * GIB > total:
        raise UserError(f"train.gpu_memory_gib {cap_gib:g}: must be above the CUDA context "
                        f"({CUDA_CONTEXT_BYTES / GIB:.1f} GiB) and at most this GPU's {total / GIB:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(allocator / total)
