"""Entry point for the CPU FSDP test: qlora-trainer's own command line, with accelerate's FSDP switched on for
gloo processes.

accelerate 1.15 enables its FSDP plugin only for accelerator devices; on a machine without one it silently trains
DDP instead. Tests have no GPU, so this shim promotes accelerate's multi-CPU state to FSDP when the launch asked
for FSDP. Everything else (torch FSDP, bitsandbytes, PEFT, TRL and qlora-trainer) runs unchanged.
"""

import os
import sys

import accelerate.state as state
import torch
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None \
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        self.fsdp_plugin = fsdp_plugin
        # Every later AcceleratorState() copies PartialState's fields over its own: change them at the source.
        # torch FSDP compares its compute device ("cpu") with the process's device: give it the plain one.
        state.PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=torch.device("cpu"))
        self.__dict__.update(state.PartialState._shared_state)


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from qlora_trainer.cli import main

    sys.exit(main())
