"""Model shapes kept on disk. Reading a shape builds the model on the meta device, which imports torch, the
transformers machinery and the model's own modeling code: seconds for `estimate`, and `recipes` reads eleven.
A shape depends only on the config's text, the transformers version that builds the model and our reading of it,
so those three are the key, and a shape read before costs one small file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from importlib.metadata import version

from qlora_trainer import __version__
from qlora_trainer.estimate.memory import Linear, ModelShape
from qlora_trainer.files.cache import cache_dir
from qlora_trainer.files.run_dir import write_json_atomic


def cached_shape(config_text: str, name: str, read: Callable[[], ModelShape]) -> ModelShape:
    """The shape of the model whose config is `config_text`: from the cache, else `read()` (which checks the
    config and raises on a model we cannot train, so only trainable shapes are stored)."""
    key = hashlib.sha256("\n".join([config_text, version("transformers"), __version__]).encode()).hexdigest()[:32]
    path = cache_dir() / "shapes" / f"{key}.json"
    try:
        return dataclasses.replace(_from_json(json.loads(path.read_text(encoding="utf-8"))), name=name)
    except (OSError, ValueError, KeyError, TypeError):  # not cached yet, or a damaged entry: read it again
        pass
    shape = read()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, dataclasses.asdict(shape))
    except OSError:  # a read-only cache costs only speed
        pass
    return shape


def _from_json(stored: dict) -> ModelShape:
    fields = {**stored, "linears": [Linear(**layer) for layer in stored["linears"]],
              "supported_attention": tuple(stored["supported_attention"])}
    return ModelShape(**fields)
