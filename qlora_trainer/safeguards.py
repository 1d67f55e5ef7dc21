"""What keeps a long run safe: checkpoints that are complete or absent, a clean stop on SIGINT/SIGTERM, and a
stop before a non-finite gradient reaches the weights."""

from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

STAGING = ".partial"


def atomic_checkpoint_trainer():
    """SFTTrainer whose checkpoints are written under checkpoints/.partial/ and renamed into place when whole,
    so a crash mid-save leaves the previous checkpoint as the newest complete one."""
    from trl import SFTTrainer

    class AtomicCheckpointTrainer(SFTTrainer):
        def _save_checkpoint(self, model, trial):
            final_root = Path(self.args.output_dir)
            staging_root = final_root / STAGING
            shutil.rmtree(staging_root, ignore_errors=True)
            name = f"checkpoint-{self.state.global_step}"
            self.args.output_dir = str(staging_root)  # the parent writes into <output_dir>/checkpoint-N
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(final_root)
            if (final_root / name).exists():  # a step saved again after a resume: replace the old copy
                shutil.rmtree(final_root / name)
            os.replace(staging_root / name, final_root / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(str(final_root), self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    return AtomicCheckpointTrainer


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current step, save a checkpoint and stop. A second signal stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = signum
        self.restore()  # a second Ctrl-C interrupts immediately
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
              "(send it again to stop at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class StopOnNonFinite(TrainerCallback):
    """Before each optimizer step, check the adapter gradients. A NaN or Inf means the update would poison the
    weights: drop it, stop, and save nothing, so the last checkpoint stays the last good state."""

    def __init__(self):
        self.bad_step: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        # One host sync per step rather than one per tensor.
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all().item():
            self.bad_step = state.global_step + 1
            for p in model.parameters():
                p.grad = None  # optimizers skip parameters without gradients: the weights stay as they were
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss) and self.bad_step is None:
            self.bad_step = state.global_step
        return self._stop(control)

    def on_step_end(self, args, state, control, **kwargs):
        return self._stop(control)

    def _stop(self, control):
        if self.bad_step is not None:
            control.should_save = False
            control.should_training_stop = True
        return control
