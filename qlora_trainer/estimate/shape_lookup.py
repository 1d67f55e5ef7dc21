"""Find a model's shape for the estimator: a known architecture (offline), a local directory or config.json, or
a hub model's config, each checked to be a text-only causal LM the estimator can read."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.errors import UserError
from qlora_trainer.estimate.memory import model_shape
from qlora_trainer.estimate.shape_cache import cached_shape
from qlora_trainer.estimate.types import ModelShape
from qlora_trainer.loading.architectures import (
    DEFAULT_FOR_SIZE,
    architecture_for,
    architecture_text,
    known_architectures,
    load_architecture,
)
from qlora_trainer.loading.model_checks import check_causal_lm, check_config_file


def shape_for_model(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> ModelShape:
    """A model's shape from a known architecture (offline), a local directory or config.json, or the hub at
    `revision` (model.revision: the config loading will read, so that the estimate is of the model that loads)."""
    known = architecture_for(name_or_path)
    if known:
        return cached_shape(architecture_text(known), known, lambda: _checked_shape(load_architecture(known), known))
    local = _config_file(name_or_path)
    if local is not None:  # every check reads only the config's text: a cached shape passed them all
        text = f"{local.read_text(encoding='utf-8', errors='replace')}\ntrust_remote_code={trust_remote_code}"
        return cached_shape(text, name_or_path,
                            lambda: _checked_shape(_read_config(name_or_path, trust_remote_code), name_or_path))
    return _checked_shape(_read_config(name_or_path, trust_remote_code, revision), name_or_path)


def _config_file(name_or_path: str) -> Path | None:
    """The config.json of a local model (a directory, the file itself, or a built demo model); None otherwise."""
    from qlora_trainer.loading.demo_model import demo_model_path, is_demo_model

    path = demo_model_path(name_or_path) if is_demo_model(name_or_path) else Path(name_or_path).expanduser()
    path = path / "config.json" if path.is_dir() else path
    return path if path.is_file() else None


def _checked_shape(config, name: str) -> ModelShape:
    check_causal_lm(config, name)  # train, estimate and recipes all come through here
    return _supported_shape(config, name)


def _supported_shape(config, name: str) -> ModelShape:
    if config.get_text_config() is not config:
        # A composite config (text plus vision or audio) loads as the whole multimodal model: LoRA's all-linear
        # would wrap the vision tower too, and the estimator's terms describe the language model only.
        raise UserError(f"model.name_or_path: '{name}' is a multimodal model ({config.model_type}, "
                        f"{', '.join(config.architectures or ['no architectures listed'])}); qlora-trainer trains "
                        "text-only causal language models: use a text-only checkpoint of the family")
    try:
        return model_shape(config, name)
    except (AttributeError, ValueError, KeyError) as err:  # configs without the decoder fields the estimator reads
        raise UserError(f"the estimator cannot read the architecture of '{name}' ({err}); it supports decoder "
                        "models with Llama-style configs (hidden_size, intermediate_size, num_attention_heads)") from None


def _read_config(name_or_path: str, trust_remote_code: bool, revision: str | None = None):
    from transformers import AutoConfig

    from qlora_trainer.loading.demo_model import demo_model_path, is_demo_model

    path = demo_model_path(name_or_path) if is_demo_model(name_or_path) else Path(name_or_path).expanduser()
    if path.exists():
        check_config_file(path, name_or_path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name_or_path, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        raise UserError(f"cannot read a config for '{name_or_path}': pass a local model directory or config.json, "
                        f"or a known architecture ({', '.join(known_architectures())})") from None


def shape_for_size(size: str) -> ModelShape:
    key = size.upper()
    if key not in DEFAULT_FOR_SIZE:
        raise UserError(f"--model-size {size}: known sizes are {', '.join(DEFAULT_FOR_SIZE)}")
    return shape_for_model(DEFAULT_FOR_SIZE[key])
