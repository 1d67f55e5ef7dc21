"""Training data: load local files or hub datasets, detect the row format, check every row, and turn rows into
the shapes TRL's trainers read, as each format in `formats.py` says (`prompt`/`completion`, `messages`, `text` or
preference rows). `sequence_fit.py` then settles the chat template and counts the rows longer than train.seq_len.

Rows are checked as Python objects before any Arrow table is built: Arrow fails on a column whose types differ
between rows with a message that names neither the row nor the field.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qlora_trainer.config.recipe import DataSection
from qlora_trainer.console import datasets_quiet
from qlora_trainer.dataset.formats import RowFormat, detect_format
from qlora_trainer.errors import UserError, first_line
from qlora_trainer.files.local_path import looks_local

LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
UTF8_BOM = b"\xef\xbb\xbf"  # some Windows editors start UTF-8 files with it


@dataclass
class Data:
    train: object  # datasets.Dataset in the shape TRL reads
    eval: object | None
    format: str  # as detected: messages, sharegpt, prompt_completion, alpaca, text, preference or kto
    source: str
    conversational: bool  # rows of chat turns (rendered with the chat template), not text used as written
    recipe_format: str  # the data.format value that names it (sharegpt rows are `messages`), for the recipe
    notes: list[str] = field(default_factory=list)  # what happened to the rows, for the run output
    stats: dict = field(default_factory=dict)  # the same as numbers, for summary.json


@dataclass
class _Rows:
    """Raw rows of one source, each with where it came from (`file:line` or `source row N`)."""
    source: str
    rows: list[tuple[str, dict | None, str | None]]  # (where, row, problem reading it)


def load_data(section: DataSection, seed: int, method: str = "sft") -> Data:
    """Load, check and convert the training (and eval) rows for train.method `method`. `recipe_format` is the
    detected format as data.format names it: the resolved recipe records it, so a rerun checks it."""
    raw = _read_source(section.path, section, "path")
    if section.max_rows:
        raw.rows = raw.rows[:section.max_rows]
    _require_some_object(raw)
    fmt = detect_format(_columns(raw), section.format, raw.source, method)
    recipe_format = "messages" if fmt.name == "sharegpt" else fmt.name
    stats: dict = {}
    notes: list[str] = []
    train = _convert(raw, fmt, section, stats, notes, "train")
    eval_set = None
    if section.eval_path:
        eval_raw = _read_source(section.eval_path, section, "eval_path")
        _require_some_object(eval_raw)
        eval_fmt = detect_format(_columns(eval_raw), recipe_format, eval_raw.source, method)
        eval_set = _convert(eval_raw, eval_fmt, section, stats, notes, "eval")
    elif section.eval_fraction > 0:
        held_out = round(len(train) * section.eval_fraction)
        if held_out < 1 or held_out >= len(train):
            raise UserError(f"data.eval_fraction {section.eval_fraction:g} of {len(train)} rows leaves "
                            f"{held_out} eval rows; use a larger share or set data.eval_path")
        parts = train.train_test_split(test_size=held_out, seed=seed)
        train, eval_set = parts["train"], parts["test"]
    stats.update(train_rows=len(train), eval_rows=len(eval_set) if eval_set is not None else 0)
    data = Data(train=train, eval=eval_set, format=fmt.name, source=raw.source,
                conversational=fmt.is_conversational(train[0]), recipe_format=recipe_format, notes=notes, stats=stats)
    notes.insert(0, count_note(data))
    return data


def _require_some_object(raw: _Rows) -> None:
    """With no row read as a JSON object there are no columns to detect a format from: name the first row's problem."""
    if not any(row for _, row, _ in raw.rows):
        where, _, problem = raw.rows[0]
        raise UserError(f"{where}: {problem or 'the row is an empty object'}; no row of {raw.source} is usable")


def count_note(data: Data) -> str:
    evals = f", {len(data.eval)} eval rows" if data.eval is not None else ""
    return f"{len(data.train)} training rows{evals} ({data.format} format, from {data.source})"


def check_data_path(section: DataSection) -> None:
    """Cheap checks for `--dry-run`: a local path must exist (a hub id is only checked when loading)."""
    for key in ("path", "eval_path"):
        value = getattr(section, key)
        if value and _looks_local(value):
            _require_exists(value, key)


def _require_exists(value: str, key: str) -> None:
    if not Path(value).expanduser().exists():
        raise UserError(f"data.{key}: {value} does not exist; fix the path or pass a hub dataset id")


def is_hub_id(value: str) -> bool:
    """A hub repository id rather than a local path."""
    return not _looks_local(value)


def _looks_local(value: str) -> bool:
    return Path(value).suffix in LOCAL_SUFFIXES or looks_local(value)


# ---------------------------------------------------------------- reading


def _read_source(value: str, section: DataSection, key: str) -> _Rows:
    path = Path(value).expanduser()
    if not _looks_local(value):
        return _read_hub(value, section, key)
    _require_exists(value, key)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
    nested = [p for p in files if not p.is_file()]
    if nested:  # e.g. Spark writes a directory `part.json/` of part files
        raise UserError(f"data.{key}: {nested[0]} is a directory, not a data file; point data.{key} at it directly "
                        f"or move it out of {path}")
    if not files:
        raise UserError(f"data.{key}: {path} holds no .jsonl, .json, .csv or .parquet files")
    rows = [row for f in files for row in _read_file(f)]
    if not rows:
        raise UserError(f"{path}: the file has no rows; add training examples")
    return _mapped(_Rows(str(path), rows), section.columns, key)


def _read_file(path: Path) -> list[tuple[str, dict | None, str | None]]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{path}: unknown file type; use .jsonl, .json, .csv or .parquet")
    if path.suffix == ".parquet":
        return _read_with_datasets(path, "parquet")
    data = path.read_bytes().removeprefix(UTF8_BOM)  # as for CSV, which pandas reads past a BOM
    if path.suffix == ".jsonl" and data.lstrip().startswith(b"["):
        raise UserError(f"{path}: holds a JSON array, but a .jsonl file holds one JSON object per line; rename it to "
                        ".json or write one object per line")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not data.lstrip().startswith(b"[")):
        return read_jsonl_rows(path, data)  # datasets also reads a .json file of one object per line
    _check_utf8(path, data)
    if path.suffix == ".csv":
        return _read_with_datasets(path, "csv")
    try:
        items = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    return [(f"{path} item {i + 1}", item if isinstance(item, dict) else None,
             None if isinstance(item, dict) else f"expected a JSON object, got {type(item).__name__}")
            for i, item in enumerate(items)]


def read_jsonl_rows(path: Path, data: bytes) -> list[tuple[str, dict | None, str | None]]:
    """One JSON object per line, read ourselves so that a bad line is reported with its number."""
    rows = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append((where, None, f"not UTF-8 (byte {err.start + 1} of the line); re-save the file as UTF-8"))
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            rows.append((where, None, f"invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object"))
            continue
        problem = None if isinstance(row, dict) else f"expected a JSON object per line, got {type(row).__name__}"
        rows.append((where, row if problem is None else None, problem))
    return rows


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte {err.start + 1} of the file); re-save the file as UTF-8") from None


def _read_with_datasets(path: Path, kind: str) -> list[tuple[str, dict | None, str | None]]:
    from datasets import load_dataset

    # Its parse errors are logged as well as raised: quiet, they are said once, below.
    with datasets_quiet():
        try:
            table = load_dataset(kind, data_files=[str(path)], split="train")
        except Exception as err:  # pyarrow and datasets raise many parse errors; all mean "this file is malformed"
            raise UserError(f"{path}: cannot parse as {kind} ({first_line(_root_cause(err))})") from None
    return [(f"{path} row {i + 1}", row, None) for i, row in enumerate(table)]


def _root_cause(err: BaseException) -> BaseException:
    """datasets wraps the parser's error ("An error occurred while generating the dataset"); the detail is inside."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _read_hub(value: str, section: DataSection, key: str) -> _Rows:
    from datasets import load_dataset

    split = section.split if key == "path" else "train"
    try:
        table = load_dataset(value, section.config, split=split)
    except Exception as err:  # datasets raises many types (network, missing config, bad split); all mean "cannot load"
        raise UserError(f"data.{key}: cannot load hub dataset '{value}' ({first_line(err)}); "
                        "check the id, data.config and data.split, or point data.path at a local file") from None
    if len(table) == 0:
        raise UserError(f"data.{key}: hub dataset '{value}' split {split} has no rows")
    return _mapped(_Rows(value, [(f"{value} row {i + 1}", row, None) for i, row in enumerate(table)]), section.columns, key)


def _mapped(raw: _Rows, columns: dict[str, str], key: str) -> _Rows:
    """The rows with data.columns applied. Every column the mapping names must exist in the source: a mapping
    that names no real column would be ignored, and where our own field names exist too the run would silently
    train on those instead."""
    found = _columns(raw)
    absent = {ours: theirs for ours, theirs in columns.items() if theirs not in found}
    if absent:
        ours, theirs = next(iter(absent.items()))
        raise UserError(f"data.columns maps {ours} to column '{theirs}', but no row of {raw.source} (data.{key}) has "
                        f"it; its columns are {', '.join(found) or 'none'}: fix the mapping or drop it")
    raw.rows = [_rename(row, columns) for row in raw.rows]
    return raw


def _rename(item, columns: dict[str, str]):
    """Apply data.columns (our field -> their column) to one row: each field takes its column's value (two fields
    may share a column, two may swap); a row without the column lacks the field, and the row checks name it."""
    where, row, problem = item
    if row is None or not columns:
        return item
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            renamed[ours] = row[theirs]
        else:
            renamed.pop(ours, None)
    return where, renamed, problem


def _columns(raw: _Rows) -> list[str]:
    return list(dict.fromkeys(k for _, row, _ in raw.rows if row for k in row))


def _convert(raw: _Rows, fmt: RowFormat, section: DataSection, stats: dict, notes: list[str], split: str):
    """Check every row, apply data.on_bad_rows, count duplicates and empty answers, build the Dataset."""
    from datasets import Dataset

    good, bad = [], []
    for where, row, problem in raw.rows:
        problem = problem or fmt.problem(row)
        if problem is None:
            row = fmt.trainer_row(row)
            problem = fmt.kind_problem(row, good[0] if good else None)
        if problem:
            bad.append((where, problem))
        else:
            good.append(row)
    _apply_bad_row_policy(raw, bad, len(raw.rows), section, stats, notes, split)
    if not good:
        raise UserError(f"{raw.source}: no usable rows")
    keys = Counter(json.dumps(r, sort_keys=True) for r in good)
    duplicates = sum(n - 1 for n in keys.values())
    empty = sum(1 for r in good if fmt.answer_is_empty(r))
    stats.update({f"{split}_duplicate_rows": duplicates, f"{split}_empty_answers": empty})
    if duplicates:
        notes.append(f"{split}: {duplicates} duplicate rows (kept; deduplicate the file if they are not intended)")
    if empty:
        notes.append(f"{split}: {empty} rows with an empty answer (kept: they train only the end-of-answer token)")
    return Dataset.from_list(good)


def _apply_bad_row_policy(raw: _Rows, bad: list, total: int, section: DataSection, stats: dict, notes: list, split: str):
    stats[f"{split}_skipped_rows"] = len(bad)
    if not bad:
        return
    where, problem = bad[0]
    if section.on_bad_rows == "error":
        more = f" ({len(bad) - 1} more bad rows; data.on_bad_rows: skip leaves them out)" if len(bad) > 1 else ""
        raise UserError(f"{where}: {problem}{more}")
    reasons = Counter(_reason(p) for _, p in bad)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
    share = len(bad) / total
    if share > section.max_bad_fraction:
        raise UserError(f"{raw.source}: {len(bad)} of {total} rows ({share:.0%}) are bad ({why}), more than "
                        f"data.max_bad_fraction {section.max_bad_fraction:g}; first: {where}: {problem}")
    stats[f"{split}_skip_reasons"] = dict(reasons)
    notes.append(f"{split}: skipped {len(bad)} of {total} bad rows ({share:.1%}): {why}; first: {where}: {problem}")


def _reason(problem: str) -> str:
    """The kind of a problem, for counting: the message up to its details."""
    return problem.split(" (")[0].split(";")[0]
