"""The prompts `generate` reads: `--prompt TEXT`, or `--file` with one prompt per line, or JSONL rows as training
reads them: a `prompt` field of text (prompt/completion files, whose prompts span several lines) or of chat turns
(conversational prompt/completion and preference rows), or a `messages` conversation, prompted up to its last
answer."""

from __future__ import annotations

import re
from pathlib import Path

from qlora_trainer.dataset.data import read_jsonl_rows
from qlora_trainer.dataset.row_fields import messages_problem, plain_turns
from qlora_trainer.errors import UserError

Prompt = str | list[dict]  # text, or chat turns (role, content) that the model answers next

# A prompt on the command line or on one line of a text file writes its line breaks as \n (and tabs as \t); \\ is
# a backslash.
_ESCAPE = re.compile(r"\\([nt\\])")
_ESCAPED = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda match: _ESCAPED[match.group(1)], text)


def read_prompts(prompt: str | None, file: Path | None) -> list[Prompt]:
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


def _jsonl_prompts(file: Path, data: bytes) -> list[Prompt]:
    prompts = []
    for where, row, problem in read_jsonl_rows(file, data):
        prompt = None
        if problem is None:
            prompt, problem = _row_prompt(row)
        if problem is not None:
            raise UserError(f"--file {where}: {problem}")
        prompts.append(prompt)
    return prompts


def _row_prompt(row: dict) -> tuple[Prompt | None, str | None]:
    """(the prompt, None) or (None, what is wrong with the row)."""
    prompt, messages = row.get("prompt"), row.get("messages")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list):
        problem = messages_problem(prompt, "prompt", "role", "content", needs_assistant=False)
        return (None, problem) if problem else (plain_turns(prompt), None)
    if isinstance(messages, list):
        problem = messages_problem(messages, "messages", "role", "content", needs_assistant=False)
        if problem:
            return None, problem
        turns = plain_turns(messages)
        answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
        cut = answers[-1] if answers else len(turns)  # the model answers where the last answer stood
        if cut == 0:
            return None, "field 'messages' opens with the assistant's turn: there is nothing before it to prompt with"
        return turns[:cut], None
    return None, ("needs a \"prompt\" field (text or chat turns) or a \"messages\" conversation, as training rows "
                  "have")


def shown(prompt: Prompt) -> str:
    """The prompt as `generate` prints it before the answer."""
    if isinstance(prompt, str):
        return prompt
    return " | ".join(f"{turn['role']}: {turn['content']}" for turn in prompt)
