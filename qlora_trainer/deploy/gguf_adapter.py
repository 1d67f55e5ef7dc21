"""Adapter-only GGUF (`--format gguf-adapter`), for Ollama's ADAPTER line: several fine-tunes share one base GGUF.

llama.cpp adds `alpha / r * B @ A` to each base weight at run time. The base GGUF is made from the original 16-bit
weights, not the NF4-rounded ones the adapter was trained against, so this is the `--base-weights original` merge,
with its drift (docs/export.md); `--format gguf` is the exact one. The file is verified by reading it back: every
LoRA layer must be there under llama.cpp's tensor name, with its alpha, and give the same update up to the GGUF's
rounding (the converter reorders Q/K rows for llama.cpp's rotary layout, so the update's norm is compared).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_trainer.deploy import llama_cpp_converter
from qlora_trainer.deploy.export import _load_adapter
from qlora_trainer.errors import UserError

# f16 and bf16 round B and A to 16 bits, q8_0 to 8 bits per 32-value block; a wrong or missing layer is off by 100%.
MAX_RELATIVE_UPDATE_ERROR = {"f16": 0.01, "bf16": 0.02, "q8_0": 0.05}


def check_convertible(adapter_dir: Path) -> dict:
    """llama.cpp applies plain LoRA with scale alpha / r: refuse what it would apply differently."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    for key, what in (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised LoRA (alpha / sqrt(r))")):
        if config.get(key):
            raise UserError(f"{adapter_dir}/adapter_config.json: {key} is set, and llama.cpp cannot apply {what} "
                            "adapters; use --format gguf, which merges it")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{adapter_dir}/adapter_config.json: per-layer rank or alpha patterns cannot be exported")
    return config


def write_adapter_gguf(adapter_dir: Path, base_config, target: Path, quant: str) -> dict:
    """Convert with llama.cpp's convert_lora_to_gguf.py, which needs only the base's config.json, then verify."""
    adapter_config = check_convertible(adapter_dir)
    config_dir = target / ".base-config"
    base_config.save_pretrained(config_dir)
    name = f"adapter-{quant}.gguf"
    llama_cpp_converter.convert_adapter(adapter_dir, config_dir, target / name, quant)
    for path in config_dir.iterdir():
        path.unlink()
    config_dir.rmdir()
    report = verify_adapter_gguf(target / name, adapter_dir, adapter_config["lora_alpha"], quant,
                                 base_config.num_hidden_layers)
    report.update(format="gguf-adapter", quant=quant, file=name)
    return report


def verify_adapter_gguf(path: Path, adapter_dir: Path, alpha: float, quant: str, n_blocks: int) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    alpha_read = reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents()
    if abs(alpha_read - alpha) > 1e-6 * abs(alpha):
        _failed(path, f"it stores lora_alpha {alpha_read}, the adapter has {alpha}")
    arch_name = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    tensors = {t.name: t for t in reader.tensors}
    adapter = _load_adapter(adapter_dir)
    worst = 0.0
    for module, (lora_a, lora_b, _) in adapter.layers.items():
        gguf_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if gguf_name is None or f"{gguf_name}.lora_a" not in tensors or f"{gguf_name}.lora_b" not in tensors:
            _failed(path, f"it has no LoRA tensors for {module}")
        update = _dequantized(tensors[f"{gguf_name}.lora_b"]) @ _dequantized(tensors[f"{gguf_name}.lora_a"])
        expected = lora_b.float() @ lora_a.float()
        worst = max(worst, abs(update.norm().item() - expected.norm().item()) / max(expected.norm().item(), 1e-12))
    pairs = sum(name.endswith(".lora_a") for name in tensors)
    if pairs != len(adapter.layers):
        _failed(path, f"it holds {pairs} LoRA layers, the adapter {len(adapter.layers)}")
    if worst > MAX_RELATIVE_UPDATE_ERROR[quant]:
        _failed(path, f"a layer's update differs by {worst:.2%} from the adapter's (max "
                      f"{MAX_RELATIVE_UPDATE_ERROR[quant]:.0%})")
    print(f"Verification of the adapter GGUF read back: {pairs} LoRA layers, alpha {alpha_read:g}, largest update "
          f"difference {worst:.4%}")
    return {"verified": True, "lora_layers": pairs, "lora_alpha": alpha_read, "max_relative_update_error": worst}


def _dequantized(tensor) -> torch.Tensor:
    from gguf import quants

    return torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()


def _failed(path: Path, why: str) -> None:
    raise UserError(f"GGUF adapter verification failed: read back, {path.name} does not match the adapter ({why}); "
                    "nothing was written")
