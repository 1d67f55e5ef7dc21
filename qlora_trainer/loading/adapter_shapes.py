"""The shapes of a saved LoRA adapter, read from its safetensors header, and the check that they fit a base model:
shared by `export`, `generate`, the multi-adapter API and a run that continues an adapter (model.adapter)."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.errors import UserError


def lora_module(key: str, part: str) -> str | None:
    """The base module a PEFT adapter tensor belongs to (`base_model.model.X.lora_A.weight` -> `X`), or None."""
    marker = f".{part}."
    return key.split(marker)[0].removeprefix("base_model.model.") if marker in key else None


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[list[int], list[int]]]:
    """LoRA A and B shapes per base module name, read from the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            for part in ("lora_A", "lora_B"):
                module = lora_module(key, part)
                if module is not None:
                    shapes.setdefault(module, {})[part] = handle.get_slice(key).get_shape()
    return {m: (s["lora_A"], s["lora_B"]) for m, s in shapes.items() if "lora_A" in s and "lora_B" in s}


BASE_FIX = "pass the base it was trained on with --base"


def check_adapter_matches(adapter_dir: Path, base_config, base_name: str, fix: str = BASE_FIX) -> None:
    """Refuse an adapter trained on another base: every adapted module must exist with the same in/out sizes."""
    import torch

    from qlora_trainer.loading.model import meta_model

    model = meta_model(base_config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for module, (a_shape, b_shape) in adapter_shapes(adapter_dir).items():
        layer = linears.get(module)
        if layer is None:
            raise UserError(f"adapter {adapter_dir} does not match base '{base_name}': the base has no layer {module}; "
                            f"{fix}")
        if a_shape[1] != layer.in_features or b_shape[0] != layer.out_features:
            raise UserError(f"adapter {adapter_dir} does not match base '{base_name}': {module} is "
                            f"{layer.in_features}->{layer.out_features} in the base but {a_shape[1]}->{b_shape[0]} "
                            f"in the adapter; {fix}")
