"""Checks of one row's fields, shared by every row shape: a field's type, and a list of chat turns."""

from __future__ import annotations

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = {"system", "user", "assistant", "tool"}


def type_problem(name: str, value, expected: str) -> str:
    got = "nothing" if value is None else type(value).__name__
    return f"field '{name}' must be {expected}, got {got}"


def messages_problem(turns, name: str, role_key: str, content_key: str, needs_assistant: bool = True) -> str | None:
    if not isinstance(turns, list) or not turns:
        return f"field '{name}' must be a non-empty list of turns, got {type(turns).__name__ if turns is not None else 'nothing'}"
    roles = SHAREGPT_ROLES if role_key == "from" else {r: r for r in ROLES}
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or not isinstance(turn.get(content_key), str):
            return f"field '{name}[{i}]' needs string '{role_key}' and '{content_key}' fields"
        if turn[role_key] not in roles:
            return f"field '{name}[{i}].{role_key}' is '{turn[role_key]}'; expected one of {', '.join(roles)}"
    if needs_assistant and not any(roles[t[role_key]] == "assistant" for t in turns):
        return f"field '{name}' has no assistant turn to learn from"
    return None


def text_or_turns_problem(row: dict, name: str, needs_assistant: bool) -> str | None:
    """A field that is a string, or a list of chat turns (with an assistant turn where it is an answer)."""
    value = row.get(name)
    if isinstance(value, list):
        return messages_problem(value, name, "role", "content", needs_assistant=needs_assistant)
    if not isinstance(value, str):
        return type_problem(name, value, "a string" if value is None else "a string or a list of messages")
    return None


def plain_turns(turns: list[dict]) -> list[dict]:
    """Turns with only their role and content (other keys would make Arrow columns of mixed types)."""
    return [{"role": t["role"], "content": t["content"]} for t in turns]
