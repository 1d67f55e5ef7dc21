"""What stops a long run safely: a clean stop on SIGINT/SIGTERM, and a stop before a non-finite gradient reaches
the weights. (Checkpoints that are complete or absent: sft_trainer.py.)"""

from __future__ import annotations

import math
import signal
import time

import torch
from transformers import TrainerCallback

from qlora_trainer.distributed import any_process


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
