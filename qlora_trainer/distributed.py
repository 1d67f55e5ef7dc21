"""Running as one of several processes under `accelerate launch` (or torchrun): who this process is, and how
the processes agree.

Every process runs the whole of `train()`. The Trainer makes the optimizer step data-parallel (DDP) or sharded
(FSDP); this module covers what surrounds it: one process writes the run directory and all of them use the same
one, and an error in any process ends every process with the same one-line message instead of leaving the
others waiting forever in a collective.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

from qlora_trainer.errors import InternalError, TrainingFailed, UserError

Strategy = Literal["single", "ddp", "fsdp"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Launch:
    """How this run was launched, as the launcher's environment variables say."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: Strategy = "single"
    cpu_offload: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if self.strategy == "single":
            return "one process"
        kind = "FSDP (4-bit weights, adapters and optimizer state sharded)" if self.strategy == "fsdp" else \
            "DDP (the 4-bit base replicated on each)"
        return f"{self.world_size} processes, {kind}{', parameters offloaded to CPU RAM' if self.cpu_offload else ''}"


def current_launch() -> Launch:
    """accelerate launch and torchrun set WORLD_SIZE/RANK/LOCAL_RANK; accelerate's FSDP config sets ACCELERATE_USE_FSDP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = _env_flag("ACCELERATE_USE_FSDP")
    return Launch(
        world_size=world,
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        strategy="fsdp" if fsdp else ("ddp" if world > 1 else "single"),
        cpu_offload=fsdp and _env_flag("FSDP_OFFLOAD_PARAMS"),
    )


def start(launch: Launch, device: str) -> None:
    """Join the process group before anything is loaded, so processes can agree on the run directory and errors.
    accelerate's PartialState is the one the Trainer uses later: gloo on CPU, NCCL on CUDA."""
    if not launch.distributed:
        return
    from accelerate import PartialState

    if device == "cuda":
        import torch

        torch.cuda.set_device(launch.local_rank)
    PartialState(cpu=device == "cpu")


def finish(launch: Launch) -> None:
    """Leave the process group together once the run is done. A process that exits with the group's threads still
    running can abort in the interpreter's teardown ("terminate called without an active exception"), turning a
    finished run into a failed launch."""
    import torch.distributed as dist

    if launch.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather(value: Any, launch: Launch) -> list[Any]:
    """Every process's `value`, in rank order (just [value] in a single process)."""
    if not launch.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * launch.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def any_process(flag: bool, device) -> bool:
    """True in every process if `flag` is true in any (a no-op outside a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@contextmanager
def together(launch: Launch):
    """Run a block in every process; if it fails in any process, all processes raise that error after the block,
    so none waits for the others in a later collective. An unexpected error travels as an InternalError."""
    if not launch.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every process must learn of any failure, or the others wait forever
        error = portable(err)
    raise_first(gather(error, launch))


def portable(err: Exception) -> Exception:
    """The error as it can travel to the other processes: ours as they are, anything else as an InternalError
    (a library's exception may not survive pickling)."""
    return err if isinstance(err, (UserError, TrainingFailed, InternalError)) else InternalError.wrapping(err)


def agreed(error: Exception) -> Exception:
    """Mark an error every process raises alike, so that only the main process prints it."""
    error.agreed = True
    return error


def raise_first(errors: list[Exception | None]) -> None:
    """Raise the lowest rank's error in every process."""
    for rank, error in enumerate(errors):
        if error is not None:
            if rank:
                named = type(error)(f"process {rank}: {error}")
                named.__dict__.update(error.__dict__)  # an InternalError's traceback text
                error = named
            raise agreed(error)


def on_main(fn: Callable[[], Any], launch: Launch) -> Any:
    """Run `fn` in the main process only and hand its result (or its error) to every process."""
    if not launch.distributed:
        return fn()
    result, error = None, None
    if launch.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - handed to every process, as in together()
            error = portable(err)
    results = gather((result, error), launch)
    raise_first([err for _, err in results])
    return results[0][0]


@contextmanager
def main_prints_only(launch: Launch):
    """Only the main process prints the plan and progress bars: N copies of every line help nobody."""
    if launch.is_main:
        yield
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    saved = sys.stdout
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        sys.stdout = devnull
        try:
            yield
        finally:
            sys.stdout = saved
