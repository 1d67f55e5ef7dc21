"""Recipe files: found by name (shipped) or path, read as YAML with each key's line remembered, changed by
`--set` overrides, validated into a Recipe with every problem in one line that names the key, its line and the
nearest known name, and written back out for the run directory."""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from qlora_trainer.config.recipe import METHOD_SECTIONS, Recipe
from qlora_trainer.errors import UserError
from qlora_trainer.files.given_paths import unusable

# ---------------------------------------------------------------- locating recipes


def shipped_recipes_dir() -> Path:
    """The recipes shipped with the package: inside it for a wheel, at the repository root for a checkout."""
    packaged = importlib.resources.files("qlora_trainer") / "recipes"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "recipes"


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped accelerate config by file name, or a path."""
    shipped = shipped_recipes_dir() / "accelerate" / name_or_path
    if shipped.is_file():
        return shipped
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    names = sorted(p.name for p in (shipped_recipes_dir() / "accelerate").glob("*.yaml"))
    raise UserError(f"distributed.accelerate_config: {name_or_path} is neither a file nor one of {', '.join(names)}")


def launch_command(recipe: Recipe, recipe_arg: str) -> str:
    """The command that runs `recipe` the way its distributed section says."""
    d = recipe.distributed
    if d.strategy == "single":
        return f"python -m qlora_trainer --recipe {recipe_arg}"
    config = accelerate_config_path(d.accelerate_config).resolve()
    shown = config.relative_to(Path.cwd()) if config.is_relative_to(Path.cwd()) else config
    return f"accelerate launch --config_file {shown} --num_processes {d.num_gpus} -m qlora_trainer --recipe {recipe_arg}"


def shipped_recipe_names() -> list[str]:
    return sorted(p.stem for p in shipped_recipes_dir().glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise UserError(f"recipe {path} is a directory, not a YAML file; pass the recipe file inside it")
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist; pass a shipped name ({', '.join(shipped_recipe_names())}) or a YAML path")
        return path
    shipped = shipped_recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = shipped_recipe_names()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(f"unknown recipe '{name_or_path}': {hint}shipped recipes are {', '.join(names)}; or pass a YAML path")


# ---------------------------------------------------------------- loading and validating


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> tuple[Recipe, Path]:
    """Load, override and validate a recipe; return it and the file it came from."""
    path = find_recipe(name_or_path)
    raw, lines = _read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of sections (model, data, train, ...), got {type(raw).__name__}")
    _resolve_relative_paths(raw, path.parent)
    overridden: dict[tuple[str, ...], str] = {}
    for item in overrides:  # after resolving, so a path given with --set stays relative to the working directory
        overridden.update(dict.fromkeys(_apply_override(raw, item), item))
    return validate(raw, source=str(path), lines=lines, overridden=overridden), path


def validate(raw: dict, source: str, lines: dict[tuple[str, ...], int] | None = None,
             overridden: dict[tuple[str, ...], str] | None = None) -> Recipe:
    """The Recipe, or one UserError naming every problem: by key and line in `source`, or by the `--set` that gave
    the value (`overridden`: key path -> the --set item), since the file has nothing to fix there."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        found = [_describe(e, lines or {}, overridden or {}) for e in err.errors()]
        problems = list(dict.fromkeys(text for text, _ in found))
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        where = "" if all(from_set for _, from_set in found) else f"{source}: "
        raise UserError(f"{where}{count}{'; '.join(problems)}") from None


def _describe(error: dict, lines: dict[tuple[str, ...], int], overridden: dict[tuple[str, ...], str]) -> tuple[str, bool]:
    """One problem as text, and whether a --set gave the value."""
    loc = tuple(str(part) for part in error["loc"] if not str(part).startswith(("function-after", "literal[", "list[")))
    item = _override_of(loc, error["msg"], overridden)
    if item is None:
        return _describe_at(error, loc, lines), False
    return f"--set {item}: {_describe_at(error, loc, {})}", True  # the file's line holds the value --set replaced


def _override_of(loc: tuple[str, ...], message: str, overridden: dict[tuple[str, ...], str]) -> str | None:
    """The --set item behind a problem at `loc`: one that set that key or a section above it, or, for a problem a
    section reports about its keys (loc is the section), one that set a key the message names."""
    for path, item in overridden.items():
        if loc[:len(path)] == path:
            return item
        named = (".".join(path[:n]) for n in range(max(len(loc) + 1, 2), len(path) + 1))
        if path[:len(loc)] == loc and any(key in message for key in named):
            return item
    return None


def _describe_at(error: dict, loc: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> str:
    key = ".".join(loc) or "recipe"
    where = f" (line {lines[loc]})" if loc in lines else ""
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}{where}: unknown key{_nearest_hint(loc)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":  # a field validator's message is about its field; a section's names its keys itself
        return f"{key}{where}: {message}" if len(loc) >= 2 else message
    return f"{key}{where}: {message} (got {error.get('input')!r})"


# Names people bring from PEFT, TRL and transformers, mapped to ours, for the "did you mean" hint.
KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lr": "learning_rate",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size", "max_length": "seq_len",
    "max_seq_length": "seq_len", "num_train_epochs": "epochs", "optim": "optimizer", "model_name": "name_or_path",
    "bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype", "dataset": "path", "warmup_steps": "warmup_ratio",
}


def _nearest_hint(loc: tuple[str, ...]) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    alias = KNOWN_ALIASES.get(loc[-1])
    close = [alias] if alias in model.model_fields else difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    prefix = ".".join(loc[:-1] + (close[0],)) if close else ""
    return f", did you mean {prefix}?" if close else f"; known keys: {', '.join(model.model_fields)}"


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"line {line}: key '{key}' is given twice (first on line {first_line}); YAML would silently "
                         "keep only the last: remove or merge one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error instead of replacing the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise DuplicateKeyError(key, key_node.start_mark.line + 1, seen[key])
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load that refuses duplicate keys: every YAML file and --set value we read goes through it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_saved_recipe(path: Path) -> dict:
    """A run's own recipe.yaml as a mapping, with the one-line errors of any recipe and a fix that fits a file
    we wrote (it was damaged after the run began)."""
    fix = "the run's saved recipe is damaged: copy the recipe the run was started with over it"
    raw, _ = _read_yaml(path, fix)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: holds a YAML {type(raw).__name__}, not a recipe; {fix}")
    return raw


def _read_yaml(path: Path, fix: str | None = None) -> tuple[Any, dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = load_yaml(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {fix or 'save the recipe as UTF-8'}") from None
    except DuplicateKeyError as err:
        raise UserError(f"{path}: {err}{f'; {fix}' if fix else ''}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}:{where}: YAML syntax error: {problem}; "
                        f"{fix or 'fix the indentation or quoting there'}") from None
    return (data if data is not None else {}), _key_lines(node)


def _key_lines(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each dotted key path to its 1-based line in the YAML file, for error messages."""
    found: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            found[path] = key_node.start_mark.line + 1
            found.update(_key_lines(value_node, path))
    return found


def _apply_override(raw: dict, item: str) -> list[tuple[str, ...]]:
    """Apply one `--set a.b=value`; the value is parsed as YAML so numbers, booleans and lists keep their type.
    Returns the key paths it set (each key of a `SECTION={...}` value)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=50")
    parts = key.strip().split(".")
    try:
        value = load_yaml(text) if text.strip() else ""
    except DuplicateKeyError as err:
        raise UserError(f"--set {key}: {str(err).removeprefix('line 1: ')}") from None
    except yaml.YAMLError:
        value = text
    target = raw
    for part in parts[:-1]:
        if not isinstance(target.get(part, {}), dict):
            raise UserError(f"--set {key}: {part} is not a section")
        target = target.setdefault(part, {})
    if isinstance(value, dict) and isinstance(target.get(parts[-1]), dict):
        # `--set 'train={seq_len: 64}'` changes the keys it names; replacing the section would silently reset
        # every other key of it to its default.
        _merge(target[parts[-1]], value)
    else:
        target[parts[-1]] = value
    return _key_paths(tuple(parts), value)


def _key_paths(prefix: tuple[str, ...], value: Any) -> list[tuple[str, ...]]:
    if not isinstance(value, dict) or not value:
        return [prefix]
    return [path for key, inner in value.items() for path in _key_paths(prefix + (str(key),), inner)]


def _merge(into: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    """A data or adapter path written in a recipe is relative to the recipe file, when such a path exists there."""
    for section, key in (("data", "path"), ("data", "eval_path"), ("model", "adapter")):
        values = raw.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        # A blank value stays blank for validation to refuse (`base / ""` is the recipe's own directory), and so
        # does one the OS cannot use, which validation names by its key.
        if (isinstance(value, str) and value.strip() and not Path(value).is_absolute() and unusable(base / value) is None
                and (base / value).exists()):
            values[key] = str((base / value).resolve())


def dump_recipe(recipe: Recipe) -> str:
    # Only the section of the method that trains: the others hold their defaults (validation refuses them set).
    unused = {name for name in METHOD_SECTIONS if name != recipe.train.method}
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=unused), sort_keys=False)
