"""An Ollama Modelfile for a GGUF export: FROM the file, a Go TEMPLATE equivalent to the chat template, and a stop
parameter for each token that ends a turn.

Ollama templates are Go templates, not Jinja, so the chat template is not copied: it is rendered with marker
contents, cut into what each role puts before and after its content, and rebuilt as one `if` per role. The rebuilt
template is checked against the Jinja one on a multi-turn conversation; a template that is more than a per-role
wrapper (one that numbers turns, say) gets no TEMPLATE line, and Ollama falls back to the template in the GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jinja2 import TemplateError

_MARK = "QLORAMARK{}QLORAMARK"
ROLES = ("system", "user", "assistant")


@dataclass
class ChatWrappers:
    head: str  # before the first message (BOS text left out when the tokenizer adds BOS itself)
    roles: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation: str  # what opens the assistant's reply
    notes: list[str] = field(default_factory=list)


def chat_wrappers(tokenizer) -> ChatWrappers | None:
    """The per-role wrappers of the tokenizer's chat template, or None when it is not such a wrapper."""
    if not tokenizer.chat_template:
        return None
    m = [_MARK.format(i) for i in range(5)]
    user1, asst2, user3 = _msg("user", m[1]), _msg("assistant", m[2]), _msg("user", m[3])
    try:
        one, two, three = _render(tokenizer, [user1]), _render(tokenizer, [user1, asst2]), _render(tokenizer, [user1, asst2, user3])
        prompt = _render(tokenizer, [user1], generation=True)
    except (TemplateError, ValueError):  # a template that refuses these turns is not a per-role wrapper
        return None
    if not (two.startswith(one) and three.startswith(two) and prompt.startswith(one)):
        return None
    user = _around(three[len(two):], m[3])
    assistant = _around(two[len(one):], m[2])
    if user is None or assistant is None or not one.endswith(m[1] + user[1]):
        return None
    head = one[:one.index(m[1])]
    if not head.endswith(user[0]):
        return None
    head = head[:len(head) - len(user[0])]
    roles = {"user": user, "assistant": assistant}
    notes = []
    system = _system(tokenizer, [user1], one, head, m[0])
    if system is None:
        notes.append("the chat template takes no system message, so the TEMPLATE has none")
    else:
        roles["system"] = system
    bos = tokenizer.bos_token
    if bos and head.startswith(bos) and _adds_bos(tokenizer):
        head = head[len(bos):]  # llama.cpp adds BOS when it tokenizes; the template must not add a second
    wrappers = ChatWrappers(head, roles, prompt[len(one):], notes)
    return wrappers if _reproduces(tokenizer, wrappers) and _fits_modelfile(wrappers) else None


def _system(tokenizer, rest: list[dict], rest_text: str, head: str, mark: str) -> tuple[str, str] | None:
    try:
        text = _render(tokenizer, [_msg("system", mark), *rest])
    except (TemplateError, ValueError):  # "System role not supported", raised by the template itself
        return None
    after_head = rest_text[len(head):]
    if not text.startswith(head) or not text.endswith(after_head):
        return None
    return _around(text[len(head):len(text) - len(after_head)], mark)


def _reproduces(tokenizer, wrappers: ChatWrappers) -> bool:
    """The rebuilt template renders a system + three-turn conversation exactly as the Jinja one does."""
    conversation = [_msg(r, f"text {i}\nof {r}") for i, r in enumerate(["user", "assistant", "user"])]
    if "system" in wrappers.roles:
        conversation.insert(0, _msg("system", "be brief"))
    expected = _render(tokenizer, conversation, generation=True)
    rendered = wrappers.head + "".join(_wrap(wrappers, m["role"], m["content"]) for m in conversation)
    bos = tokenizer.bos_token or ""
    return expected in (rendered + wrappers.generation, bos + rendered + wrappers.generation)


def _fits_modelfile(wrappers: ChatWrappers) -> bool:
    """Text a Go template or a Modelfile's triple-quoted TEMPLATE would read as syntax cannot be carried."""
    pieces = [wrappers.head, wrappers.generation, *(p for pair in wrappers.roles.values() for p in pair)]
    return not any("{{" in p or '"""' in p for p in pieces)


def _wrap(wrappers: ChatWrappers, role: str, content: str) -> str:
    before, after = wrappers.roles[role]
    return before + content + after


def go_template(wrappers: ChatWrappers) -> str:
    """The wrappers as an Ollama (Go) template over `.Messages`. No `{{-` trimming: the wrappers' own newlines
    are part of the format."""
    branches = [f'{"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
                for i, (role, (before, after)) in enumerate((r, wrappers.roles[r]) for r in ROLES if r in wrappers.roles)]
    body = "{{ " + "{{ ".join(branches) + "{{ end }}"
    return f"{wrappers.head}{{{{ range .Messages }}}}{body}{{{{ end }}}}{wrappers.generation}"


def stop_tokens(tokenizer, wrappers: ChatWrappers | None, eos_token_ids: list[int]) -> list[str]:
    """Every token that ends a turn: the EOS tokens (tokenizer and generation config) and the special tokens that
    close an assistant message in the chat template (`<|im_end|>`, `<end_of_turn>`)."""
    stops = [tokenizer.convert_ids_to_tokens(i) for i in eos_token_ids]
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    if wrappers is not None:
        closing = wrappers.roles["assistant"][1]
        added = [t.content for t in tokenizer.added_tokens_decoder.values()]
        stops += [t for t in sorted(added, key=closing.find) if t and t in closing]
    return list(dict.fromkeys(s for s in stops if s))


def modelfile(gguf_name: str, wrappers: ChatWrappers | None, stops: list[str], header: str,
              adapter: str | None = None) -> str:
    lines = [f"# {line}" for line in header.splitlines()] + [f"FROM ./{gguf_name}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter}")
    if wrappers is not None:
        lines.append(f'TEMPLATE """{go_template(wrappers)}"""')
    lines += [f'PARAMETER stop "{_quoted(stop)}"' for stop in stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _around(text: str, mark: str) -> tuple[str, str] | None:
    if text.count(mark) != 1:
        return None
    before, after = text.split(mark)
    return before, after


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _render(tokenizer, messages: list[dict], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
