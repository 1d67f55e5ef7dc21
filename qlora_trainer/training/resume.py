"""--resume: the checkpoint to continue from, and nothing of the run rewritten before that checkpoint has loaded.

Every file of the newest complete checkpoint is read back with the loader the Trainer will use (JSON, safetensors,
`torch.load(weights_only=True)`) before the run relies on it. A file that will not load (a truncated optimizer.pt
after a full disk, say) is named and the previous complete checkpoint is tried, down to the oldest. The extra
read costs the size of the adapter and optimizer state, small next to the base model.

The run's own files (recipe.yaml, estimate.json, and metrics.jsonl cut back to the checkpoint's step) are written
only at the first step of the resumed training: by then the Trainer has loaded the adapter, optimizer, scheduler
and RNG state, so a resume that fails before that leaves the run directory as it found it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from transformers import TrainerCallback

from qlora_trainer.errors import UserError, first_line
from qlora_trainer.files.run_dir import CHECKPOINTS, complete_checkpoints, write_text_atomic

REQUIRED = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors")
# The PyTorch files the Trainer loads on resume (training_args.bin is written for people, never read back).
TORCH_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt")


def usable_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint whose files all load, saying on stdout which newer ones were passed over;
    None where the run has no complete checkpoint. Raises when every checkpoint is damaged."""
    passed_over = []
    for checkpoint in complete_checkpoints(run):
        problem = damage(checkpoint)
        if problem is None:
            if passed_over:
                print(f"--resume: {'; '.join(passed_over)}; resuming from the previous complete checkpoint "
                      f"{checkpoint.name} instead (a damaged checkpoint is replaced when the run saves its step again)",
                      flush=True)
            return checkpoint
        passed_over.append(f"{problem} will not load")
    if passed_over:
        damaged = [str(p) for p in complete_checkpoints(run)]
        raise UserError(f"--resume: {passed_over[0]}, and no older checkpoint in {run / CHECKPOINTS} loads; delete "
                        f"{' '.join(damaged)} to resume this run from step 0 (or choose a new --output-dir)")
    return None


def damage(checkpoint: Path) -> str | None:
    """'<file> (<reason>)' for the first file of a checkpoint that is missing or will not load, else None."""
    for name in REQUIRED:
        if not (checkpoint / name).is_file():
            return f"{checkpoint / name} (missing)"
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file():
            problem = read_back(path)
            if problem is not None:
                return f"{path} ({problem})"
    return None


def read_back(path: Path) -> str | None:
    """Why one checkpoint file does not load, or None. Other files (FSDP's sharded state, training_args.bin) are
    left to their loader, if any."""
    from safetensors import SafetensorError

    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        elif path.name in TORCH_STATE or (path.name.startswith("rng_state") and path.suffix == ".pth"):
            import torch
            from transformers.trainer_pt_utils import safe_globals

            with safe_globals():  # the numpy RNG state, as the Trainer allows it when it loads the same file
                torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        return f"unreadable: {err.strerror}"
    except (SafetensorError, ValueError, EOFError, RuntimeError, OSError, pickle.UnpicklingError) as err:
        # A JSON decode error is a ValueError; torch.load of a truncated file raises any of the others.
        return f"damaged or truncated: {first_line(err)}"
    return None


def wont_load(checkpoint: Path, err: Exception) -> UserError:
    """A checkpoint whose files read back but that the Trainer still cannot load (an adapter of another shape)."""
    return UserError(f"--resume: {checkpoint} will not load ({type(err).__name__}: {first_line(err)}); delete "
                     f"{checkpoint} to resume from the checkpoint before it")


def resumed_metrics(run: Path, step: int) -> str:
    """metrics.jsonl without the rows after `step`: the resumed run logs those steps again. A line torn by a kill
    mid-append can only be the last one, logged after the checkpoint: it goes with them."""
    path = run / "metrics.jsonl"
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(json.dumps(row) + "\n")
    return "".join(kept)


class WriteWhenLoaded(TrainerCallback):
    """Write the files a resume deferred (name -> text, in the run directory) at the first step, or at the end of
    a resume with no steps left; in the main process only."""

    def __init__(self, run: Path, files: dict[str, str]):
        self.run, self.files = run, files

    def on_step_begin(self, args, state, control, **kwargs):
        self._write(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(state)

    def _write(self, state) -> None:
        if state.is_world_process_zero:
            for name, text in self.files.items():
                write_text_atomic(self.run / name, text)
        self.files = {}
