"""The prompts `generate` reads: `--prompt TEXT`, or `--file` with one prompt per line, or JSONL rows with a
`prompt` field (training's own prompt/completion files, whose prompts span several lines)."""

from __future__ import annotations

import re
from pathlib import Path

from qlora_trainer.dataset.data import read_jsonl_rows
from qlora_trainer.errors import UserError

# A prompt on the command line or on one line of a text file writes its line breaks as \n (and tabs as \t); \\ is
# a backslash.
_ESCAPE = re.compile(r"\\([nt\\])")
_ESCAPED = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda match: _ESCAPED[match.group(1)], text)


def read_prompts(prompt: str | None, file: Path | None) -> list[str]:
    """The prompts to generate from, checked before any model loads."""
    if prompt is not None:
        if not prompt.strip():
            raise UserError("--prompt is empty; pass the text to continue, e.g. --prompt 'Hello'")
        return [unescape(prompt)]
    if not file.is_file():
        raise UserError(f"--file {file} is a directory, not a text file of prompts" if file.is_dir() else
                        f"--file {file} does not exist")
    data = file.read_bytes()
    prompts = _jsonl_prompts(file, data) if file.suffix == ".jsonl" else _text_prompts(file, data)
    if not prompts:
        raise UserError(f"--file {file} holds no prompts (every line is blank); write one prompt per line")
    return prompts


def _text_prompts(file: Path, data: bytes) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--file {file} is not UTF-8 text; save it as UTF-8") from None
    return [unescape(line) for line in text.splitlines() if line.strip()]


def _jsonl_prompts(file: Path, data: bytes) -> list[str]:
    prompts = []
    for where, row, problem in read_jsonl_rows(file, data):
        if problem is None and not isinstance(row.get("prompt"), str):
            problem = "needs a text \"prompt\" field, as prompt/completion training rows have"
        if problem is not None:
            raise UserError(f"--file {where}: {problem}")
        prompts.append(row["prompt"])
    return prompts
