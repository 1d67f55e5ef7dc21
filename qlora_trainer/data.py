"""Training data: load local files or hub datasets, detect the row shape, check every row, and turn rows
into the shapes TRL's SFTTrainer reads (`prompt`/`completion`, `messages` or `text`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_trainer.errors import UserError
from qlora_trainer.recipe import DataSection

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# The Stanford Alpaca prompt, so that alpaca-format data trains the way the Alpaca models were trained.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                            "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                            "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

# The fields each format needs; `auto` picks the first format whose fields are all present.
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


@dataclass
class Data:
    train: object  # datasets.Dataset
    eval: object | None
    format: str
    source: str


def load_data(section: DataSection, seed: int) -> Data:
    train_rows, source = _load_rows(section.path, section)
    if section.max_rows:
        train_rows = train_rows.select(range(min(section.max_rows, len(train_rows))))
    fmt = detect_format(train_rows.column_names, section.format, source)
    train = to_trainer_rows(train_rows, fmt, source)
    eval_set = None
    if section.eval_path:
        eval_rows, eval_source = _load_rows(section.eval_path, section, split_name="eval")
        eval_set = to_trainer_rows(eval_rows, detect_format(eval_rows.column_names, fmt, eval_source), eval_source)
    elif section.eval_fraction > 0:
        parts = train.train_test_split(test_size=section.eval_fraction, seed=seed)
        train, eval_set = parts["train"], parts["test"]
    return Data(train=train, eval=eval_set, format=fmt, source=source)


def check_data_path(section: DataSection) -> None:
    """Cheap checks for `--dry-run`: a local path must exist (a hub id is only checked when loading)."""
    for key in ("path", "eval_path"):
        value = getattr(section, key)
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            raise UserError(f"data.{key}: {value} does not exist; fix the path or pass a hub dataset id")


def _looks_local(value: str) -> bool:
    return Path(value).suffix in LOCAL_SUFFIXES or value.startswith((".", "/", "~")) or Path(value).exists()


def _load_rows(value: str, section: DataSection, split_name: str = "train"):
    from datasets import Dataset, load_dataset

    path = Path(value).expanduser()
    if _looks_local(value):
        if not path.exists():
            raise UserError(f"data.{'path' if split_name == 'train' else 'eval_path'}: {value} does not exist; fix the path or pass a hub dataset id")
        if path.suffix == ".jsonl":
            return Dataset.from_list(read_jsonl(path)), str(path)
        return _load_local_with_datasets(path), str(path)
    try:
        rows = load_dataset(value, section.config, split=section.split if split_name == "train" else "train")
    except Exception as err:  # datasets raises many types (network, missing config, bad split); all mean "cannot load"
        raise UserError(f"data.path: cannot load hub dataset '{value}' ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        "check the id, data.config and data.split, or point data.path at a local file") from None
    return rows, value


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file ourselves so that a bad line is reported with its number."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); re-save the file as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: the file has no rows; add training examples, one JSON object per line")
    return rows


def _load_local_with_datasets(path: Path):
    from datasets import load_dataset

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"data.path: {path} holds no .jsonl, .json, .csv or .parquet files")
    kinds = {LOCAL_SUFFIXES.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise UserError(f"data.path: {path}: expected files of one kind among .jsonl/.json/.csv/.parquet")
    try:
        rows = load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train")
    except Exception as err:  # pyarrow and datasets raise many parse errors; all mean "this file is malformed"
        raise UserError(f"{path}: cannot parse ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if len(rows) == 0:
        raise UserError(f"{path}: the file has no rows; add training examples")
    return rows


def detect_format(columns: list[str], requested: str, source: str) -> str:
    if "conversations" in columns and "messages" not in columns and requested in ("auto", "messages"):
        return "sharegpt"
    if requested != "auto":
        missing = [f for f in REQUIRED_FIELDS[requested] if f not in columns]
        if missing:
            raise UserError(f"{source}: data.format is {requested} but the rows have no {', '.join(missing)} field; "
                            f"columns are {', '.join(columns)}")
        return requested
    for fmt, fields in REQUIRED_FIELDS.items():
        if all(f in columns for f in fields):
            return fmt
    raise UserError(f"{source}: cannot tell the data format from the columns {', '.join(columns)}; rows need "
                    "messages, prompt+completion, instruction+output or text")


def to_trainer_rows(rows, fmt: str, source: str):
    """Check every row, then convert alpaca and ShareGPT rows to the shapes TRL reads."""
    for index, row in enumerate(rows):
        problem = _row_problem(row, fmt)
        if problem:
            where = f"{source}:{index + 1}" if source.endswith(".jsonl") else f"{source} row {index + 1}"
            raise UserError(f"{where}: {problem}")
    if fmt == "alpaca":
        return rows.map(_alpaca_to_prompt_completion, remove_columns=rows.column_names)
    if fmt == "sharegpt":
        return rows.map(_sharegpt_to_messages, remove_columns=rows.column_names)
    keep = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"], "text": ["text"]}[fmt]
    return rows.select_columns(keep)


def _row_problem(row: dict, fmt: str) -> str | None:
    if fmt == "messages":
        return _messages_problem(row.get("messages"), "messages", "role", "content")
    if fmt == "sharegpt":
        return _messages_problem(row.get("conversations"), "conversations", "from", "value")
    fields = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"), "text": ("text",)}[fmt]
    for field in fields:
        value = row.get(field)
        if not isinstance(value, str):
            return f"field '{field}' must be a string, got {type(value).__name__ if value is not None else 'nothing'}"
    if fmt == "alpaca" and row.get("input") is not None and not isinstance(row["input"], str):
        return f"field 'input' must be a string, got {type(row['input']).__name__}"
    return None


def _messages_problem(turns, field: str, role_key: str, content_key: str) -> str | None:
    if not isinstance(turns, list) or not turns:
        return f"field '{field}' must be a non-empty list of turns"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(content_key), str):
            return f"{field}[{i}] needs string '{role_key}' and '{content_key}' fields"
    return None


def _alpaca_to_prompt_completion(row: dict) -> dict:
    template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
    return {"prompt": template.format(instruction=row["instruction"], input=row.get("input") or ""),
            "completion": row["output"]}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_to_messages(row: dict) -> dict:
    return {"messages": [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in row["conversations"]]}
