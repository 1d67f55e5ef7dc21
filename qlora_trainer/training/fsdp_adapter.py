"""The adapter under FSDP: gather it, save it, load it and its optimizer state back into a sharded model.

PEFT 0.21 picks an adapter's weights by module name, and under FSDP the module names carry FSDP's wrapper names
in the middle (`..._fsdp_wrapped_module.lora_A...`), so PEFT's own save, and accelerate's sharded checkpoint of
an adapter (`adapter_only`), hold no weights at all. Here the adapter goes through the full state dict instead,
under the names its weights had before FSDP flattened them, and is written as PEFT writes it.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_FILE = "adapter_model.safetensors"


def gather_full_state(model, on_gpu: bool) -> dict:
    """The full state dict, gathered to the main process (empty elsewhere); every process must call it."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    # Moved to CPU RAM from a GPU; torch fails "offloading" tensors that are already on the CPU.
    config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def _file_key(name: str, adapter: str) -> str:
    """PEFT's file key drops the adapter name: `q_proj.lora_A.default.weight` -> `q_proj.lora_A.weight`."""
    return name.replace(f".{adapter}.", ".")


def save_gathered_adapter(peft_model, state: dict, names: list[str], directory: Path) -> None:
    """Write adapter_model.safetensors and adapter_config.json from a gathered state dict (main process)."""
    from safetensors.torch import save_file

    adapter = peft_model.active_adapter
    weights = {_file_key(name, adapter): state[name].contiguous() for name in names}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    peft_model.peft_config[adapter].save_pretrained(str(directory))


def load_adapter_into(model, peft_model, names: list[str], directory: Path) -> None:
    """Copy a saved adapter into the sharded model; every process reads the file and keeps its shard."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    saved = load_file(str(directory / ADAPTER_FILE))
    adapter = peft_model.active_adapter
    missing = [name for name in names if _file_key(name, adapter) not in saved]
    if missing:
        raise RuntimeError(f"{directory / ADAPTER_FILE} lacks {len(missing)} adapter weights, e.g. {missing[0]}")
    state = {name: saved[_file_key(name, adapter)] for name in names}
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights not in the model: {result.unexpected_keys[:3]}")


def load_optimizer_state(model, optimizer, checkpoint: Path) -> None:
    """Load the sharded optimizer state of a checkpoint (every process).

    accelerate loads it into a copy of the optimizer's current state, which right after a resume has no
    per-parameter entries yet (Adam creates them at its first step): the moments were silently left at zero.
    torch's loader reads the layout from the checkpoint's own metadata instead.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state = load_sharded_optimizer_state_dict(model_state_dict=model.state_dict(), optimizer_key="optimizer",
                                                  storage_reader=dcp.FileSystemReader(str(checkpoint / "optimizer_0")))
        flat = FullyShardedDataParallel.optim_state_dict_to_load(model, optimizer, state["optimizer"])
    optimizer.load_state_dict(flat)
