"""The Ollama Modelfile's TEMPLATE is the chat template rebuilt per role, or absent when it cannot be."""

from __future__ import annotations

import re

import pytest

from qlora_trainer.config.recipe_files import shipped_recipes_dir
from qlora_trainer.deploy import modelfile
from qlora_trainer.loading.demo_model import CHATML_TEMPLATE, _train_tokenizer

# Gemma's shape: BOS in the template, no system role (the template raises), assistant spelled "model".
GEMMA_STYLE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<|im_start|>' + role + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>model\n' }}{% endif %}")
# Numbers its turns: no per-role wrapper reproduces it.
NUMBERED = "{% for message in messages %}{{ loop.index|string + message['content'] }}{% endfor %}"


def template_of(modelfile_text: str) -> str:
    return re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.M | re.S).group(1)


def render_go_template(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of the one shape modelfile.go_template writes: head, a range over the messages with one
    `if eq .Role` branch per role, and the generation prompt."""
    head, rest = template.split("{{ range .Messages }}")
    body, generation = rest.rsplit("{{ end }}", 1)
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\{\{ end \}\}$)', body,
                               re.S))
    return head + "".join(branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages) + generation


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer(shipped_recipes_dir() / "data" / "complaints-train.jsonl", 320)


def test_chatml_becomes_a_go_template_that_renders_the_same(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    wrappers = modelfile.chat_wrappers(tokenizer)
    text = modelfile.modelfile("m.gguf", wrappers, modelfile.stop_tokens(tokenizer, wrappers, [2]), "header")
    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u\nv"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "w"}]
    assert render_go_template(template_of(text), conversation) == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    assert text.splitlines()[:2] == ["# header", "FROM ./m.gguf"]
    assert text.count('PARAMETER stop "</s>"') == 1 and 'PARAMETER stop "<|im_end|>"' in text


def test_a_template_without_system_role_leaves_bos_to_llama_cpp(tokenizer):
    tokenizer.chat_template = GEMMA_STYLE
    wrappers = modelfile.chat_wrappers(tokenizer)
    assert "system" not in wrappers.roles and wrappers.notes
    assert wrappers.head == ("" if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id else tokenizer.bos_token)
    conversation = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    rendered = render_go_template(modelfile.go_template(wrappers), conversation)
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert expected in (rendered, tokenizer.bos_token + rendered)
    assert rendered.endswith("<|im_start|>model\n")


def test_a_template_that_is_not_a_per_role_wrapper_gets_no_template_line(tokenizer):
    tokenizer.chat_template = NUMBERED
    assert modelfile.chat_wrappers(tokenizer) is None
    text = modelfile.modelfile("m.gguf", None, modelfile.stop_tokens(tokenizer, None, []), "h")
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text
