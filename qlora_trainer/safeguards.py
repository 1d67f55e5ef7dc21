"""What keeps a long run safe: checkpoints that are complete or absent, a clean stop on SIGINT/SIGTERM, and a
stop before a non-finite gradient reaches the weights."""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from qlora_trainer.distributed import any_process
from transformers.trainer_utils import rotate_checkpoints

STAGING = ".partial"


def atomic_checkpoint_trainer():
    """SFTTrainer whose checkpoints are written under checkpoints/.partial/ and renamed into place when whole,
    so a crash mid-save leaves the previous checkpoint as the newest complete one."""
    from trl import SFTTrainer

    class AtomicCheckpointTrainer(SFTTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """PEFT's load_adapter brings the adapter back in fp32 (autocast_adapter_dtype): put each trainable
            weight back in the dtype it trained in, before DDP builds its gradient buckets for it, or a resumed
            run would not continue the uninterrupted one (DESIGN.md, known traps)."""
            target = model if model is not None else self.model
            dtypes = {name: p.dtype for name, p in target.named_parameters() if p.requires_grad}
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            for name, param in target.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

        def _save_checkpoint(self, model, trial):
            # Every process writes into the staging directory (the main one the adapter and optimizer, each one
            # its rng_state_<rank>.pth); only the main process clears and renames it, between barriers.
            final_root = Path(self.args.output_dir)
            staging_root = final_root / STAGING
            main = self.args.should_save
            if main:
                shutil.rmtree(staging_root, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            name = f"checkpoint-{self.state.global_step}"
            self.args.output_dir = str(staging_root)  # the parent writes into <output_dir>/checkpoint-N
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = str(final_root)
            self.accelerator.wait_for_everyone()
            if main:
                if (final_root / name).exists():  # a step saved again after a resume: replace the old copy
                    shutil.rmtree(final_root / name)
                os.replace(staging_root / name, final_root / name)
                shutil.rmtree(staging_root, ignore_errors=True)
                rotate_checkpoints(str(final_root), self.args.save_total_limit, self.state.best_model_checkpoint,
                                   use_mtime=True)
            self.accelerator.wait_for_everyone()

    return AtomicCheckpointTrainer


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current step, save a checkpoint and stop. A second signal stops at once.

    Under `accelerate launch` Ctrl-C reaches every process, and the launcher passes it on again a moment later:
    a repeat within REPEAT_GRACE_S is the same request. Processes agree at each step end, so all stop together.
    """

    REPEAT_GRACE_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self._received_at = 0.0
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
        now = time.monotonic()
        if self.received is not None:
            if now - self._received_at < self.REPEAT_GRACE_S:
                return
            raise KeyboardInterrupt  # a second, deliberate Ctrl-C stops at once
        self.received, self._received_at = signum, now
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
              "(send it again to stop at once)", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(self.received is not None, args.device):
            self.received = self.received or signal.SIGTERM  # another process was signalled
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
        # One host sync per step rather than one per tensor; under FSDP each process checks only its shard.
        finite = not grads or torch.stack([torch.isfinite(g).all() for g in grads]).all().item()
        if any_process(not finite, args.device):
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
