"""The SFTTrainer we run (and, over the same changes, TRL's preference trainers), with four changes: checkpoints
are complete or absent, a resumed adapter keeps the dtype it trained in, under FSDP the adapter is saved and
restored whole (fsdp_adapter.py says why), and a checkpoint that fails to load is named."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.trainer_utils import rotate_checkpoints

from qlora_trainer.errors import TrainingFailed, UserError
from qlora_trainer.files.run_dir import apply_umask
from qlora_trainer.training import fsdp_adapter
from qlora_trainer.training.resume import wont_load

STAGING = ".partial"


def qlora_sft_trainer(trainer_class=None):
    """Our subclass of TRL's SFTTrainer, or of `trainer_class` (DPOTrainer, KTOTrainer, ORPOTrainer)."""
    from trl import SFTTrainer

    class QLoraSFTTrainer(trainer_class or SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Named before FSDP flattens them into its own parameters.
            self.adapter_names = [name for name, p in self.model.named_parameters() if p.requires_grad]

        def _save_checkpoint(self, model, trial):
            """Write checkpoint-N under checkpoints/.partial/ and rename it into place when whole, so a crash
            mid-save leaves the previous checkpoint the newest complete one. Every process writes its part (the
            main one the adapter and optimizer, each its rng_state_<rank>.pth); the main one renames, between
            barriers."""
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
            if self.is_fsdp_enabled:  # accelerate's sharded checkpoint holds no adapter weights
                self.save_adapter(staging_root / name)
            self.accelerator.wait_for_everyone()
            if main:
                if (final_root / name).exists():  # a step saved again after a resume: replace the old copy
                    shutil.rmtree(final_root / name)
                os.replace(staging_root / name, final_root / name)
                apply_umask(final_root / name)
                shutil.rmtree(staging_root, ignore_errors=True)
                rotate_checkpoints(str(final_root), self.args.save_total_limit, self.state.best_model_checkpoint,
                                   use_mtime=True)
            self.accelerator.wait_for_everyone()

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            """PEFT's load_adapter brings the adapter back in fp32 (autocast_adapter_dtype): put each trainable
            weight back in the dtype it trained in, before DDP builds its gradient buckets for it, or a resumed
            run would not continue the uninterrupted one (DESIGN.md, known traps)."""
            target = model if model is not None else self.model
            dtypes = {name: p.dtype for name, p in target.named_parameters() if p.requires_grad}
            with _loading(resume_from_checkpoint):
                super()._load_from_checkpoint(resume_from_checkpoint, model)
                if self.is_fsdp_enabled:
                    fsdp_adapter.load_adapter_into(target, self.peft_model, self.adapter_names, Path(resume_from_checkpoint))
            for name, param in target.named_parameters():
                if name in dtypes and param.dtype != dtypes[name]:
                    param.data = param.data.to(dtypes[name])

        def _load_optimizer_and_scheduler(self, checkpoint):
            with _loading(checkpoint):
                super()._load_optimizer_and_scheduler(checkpoint)
                if checkpoint is not None and self.is_fsdp_enabled:
                    fsdp_adapter.load_optimizer_state(self.model, self.optimizer.optimizer, Path(checkpoint))

        def _load_rng_state(self, checkpoint):
            with _loading(checkpoint):
                super()._load_rng_state(checkpoint)

        @property
        def peft_model(self):
            """The PEFT model inside whatever DDP or FSDP wrapped around it."""
            return self.accelerator.unwrap_model(self.model)

        def save_adapter(self, directory: Path) -> None:
            """The adapter as PEFT writes it; under FSDP every process must call this (the weights are gathered)."""
            if not self.is_fsdp_enabled:
                if self.args.should_save:  # not DPO's and KTO's frozen "ref" copy of a continued adapter
                    self.peft_model.save_pretrained(directory, safe_serialization=True, selected_adapters=["default"])
                return
            state = fsdp_adapter.gather_full_state(self.model, on_gpu=self.args.device.type != "cpu")
            if self.args.should_save:
                fsdp_adapter.save_gathered_adapter(self.peft_model, state, self.adapter_names, directory)

    return QLoraSFTTrainer


@contextmanager
def _loading(checkpoint):
    """resume.py reads every file back before a resume, so this is for what still fails in the Trainer's own
    loading: the error names the checkpoint and what to delete instead of escaping as the library's."""
    try:
        yield
    except (UserError, TrainingFailed, torch.cuda.OutOfMemoryError, MemoryError):
        raise  # ours already, or the machine's, not the checkpoint's
    except Exception as err:  # noqa: BLE001 - any failure here is this checkpoint's, whatever library raised it
        raise wont_load(Path(checkpoint), err) from err
