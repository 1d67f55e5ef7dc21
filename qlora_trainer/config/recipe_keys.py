"""Every recipe key with its type, default and description, read from the schema (recipe.py) so that the
reference cannot drift from what the recipe accepts: `python -m qlora_trainer keys`, and docs/recipe-keys.md."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from qlora_trainer.config.recipe import Recipe


@dataclass(frozen=True)
class Key:
    name: str  # "train.seq_len"
    type: str  # "int > 0", "auto | int", "nf4 | fp4"
    default: str  # "2048", "(required)"
    description: str


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[Key]:
    """The keys of `model`, sections expanded, in the schema's order."""
    keys = []
    for name, field in model.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) else None
        if section is not None and issubclass(section, BaseModel):
            keys += recipe_keys(section, f"{prefix}{name}.")
            continue
        keys.append(Key(prefix + name, _type_name(field), _default(field), field.description or ""))
    return keys


def _type_name(field) -> str:
    bounds = [f"{word} {getattr(m, attr)}" for m in field.metadata
              for attr, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
    return _annotation(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")


def _annotation(annotation) -> str:
    """`int | Literal["auto"]` -> "int | auto"; `list[str]` -> "list of str"; `dict[str, str]` -> "mapping"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_annotation(a) for a in args if a is not type(None))
    if origin is list:
        return f"list of {_annotation(args[0])}"
    if origin is dict:
        return f"mapping of {_annotation(args[0])} to {_annotation(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required() or field.default is PydanticUndefined:
        return "(required)"
    value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "unset"
    return str(value).lower() if isinstance(value, bool) else str(value) if value != "" else '""'


def format_keys(keys: list[Key], markdown: bool = False) -> str:
    if markdown:
        rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
        rows += [f"| `{k.name}` | {k.type.replace('|', '&#124;')} | `{k.default}` | "
                 f"{k.description.replace('|', '&#124;')} |" for k in keys]
        return "\n".join(rows)
    width = max(len(k.name) for k in keys)
    return "\n".join(f"{k.name:<{width}}  {k.type}; default {k.default}\n{'':<{width}}  {k.description}" for k in keys)
