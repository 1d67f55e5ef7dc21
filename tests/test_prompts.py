"""The prompts `generate` reads: escapes on the command line, text files, and JSONL rows of training data."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, refused_cleanly
from hypothesis import given
from hypothesis import strategies as st

from qlora_trainer.deploy.prompts import read_prompts, unescape
from qlora_trainer.errors import UserError

HELDOUT = REPO / "recipes" / "data" / "complaints-heldout.jsonl"


def test_escapes_become_line_breaks_and_tabs():
    assert unescape(r"Tweet: late\nLabel:") == "Tweet: late\nLabel:"
    assert unescape(r"a\tb") == "a\tb"
    assert unescape(r"C:\\new") == "C:\\new"  # an escaped backslash stays one backslash before the n


@given(st.text())
def test_escaping_then_unescaping_gives_the_text_back(text):
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    assert unescape(escaped) == text


def test_training_rows_give_their_multi_line_prompts():
    prompts = read_prompts(None, HELDOUT)
    expected = [json.loads(line)["prompt"] for line in HELDOUT.read_text(encoding="utf-8").splitlines()]
    assert prompts == expected and all("\n" in p for p in prompts)


def test_a_text_file_gives_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\n  \nTweet: late\\nLabel:\n", encoding="utf-8")
    assert read_prompts(None, path) == ["first", "Tweet: late\nLabel:"]


def test_conversational_rows_give_their_turns_up_to_the_last_answer(tmp_path):
    path = tmp_path / "chats.jsonl"
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is my parcel late?"}
    answer, again = {"role": "assistant", "content": "Yes.", "weight": 1}, {"role": "user", "content": "Why?"}
    rows = [{"messages": [system, user, answer]},  # a training row: prompt with what came before its answer
            {"messages": [system, user, answer, again, {"role": "assistant", "content": "Snow."}]},
            {"messages": [user]},  # no answer yet: the model answers the whole conversation
            {"prompt": [user], "completion": [answer]},  # conversational prompt/completion
            {"prompt": [user], "chosen": [answer], "rejected": [again]}]  # a conversational preference pair
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    assert read_prompts(None, path) == [[system, user], [system, user, {"role": "assistant", "content": "Yes."}, again],
                                        [user], [user], [user]]


def test_chat_turn_prompts_are_rendered_with_the_chat_template(tmp_path):
    from qlora_trainer.deploy.generate import format_prompt
    from qlora_trainer.deploy.prompts import shown
    from qlora_trainer.loading.demo_model import CHATML_TEMPLATE, _train_tokenizer

    tokenizer = _train_tokenizer(REPO / "recipes" / "data" / "complaints-train.jsonl", 320)
    turns = [{"role": "user", "content": "Is my parcel late?"}]
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="has no chat template"):
        format_prompt(turns, None, tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    assert format_prompt(turns, None, tokenizer) == "<|im_start|>user\nIs my parcel late?<|im_end|>\n<|im_start|>assistant\n"
    assert shown(turns + [{"role": "assistant", "content": "Yes."}]) == "user: Is my parcel late? | assistant: Yes."


@pytest.mark.parametrize("content, fragment", [
    ('{"prompt": "ok"}\n{"completion": "x"}\n', "rows.jsonl:2: needs a \"prompt\" field (text or chat turns)"),
    ('{"prompt": "ok"}\nnot json\n', "rows.jsonl:2: invalid JSON"),
    ('{"prompt": 3}\n', "rows.jsonl:1: needs a \"prompt\" field"),
    ('{"prompt": [{"role": "user"}]}\n', "rows.jsonl:1: field 'prompt[0]' needs string 'role' and 'content'"),
    ('{"messages": [{"role": "assistant", "content": "Hi"}]}\n', "rows.jsonl:1: field 'messages' opens with the "
                                                                  "assistant's turn"),
    ('{"messages": [{"role": "robot", "content": "Hi"}]}\n', "rows.jsonl:1: field 'messages[0].role' is 'robot'"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_files_are_named_with_their_line(tmp_path, content, fragment):
    path = tmp_path / "rows.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=None) as info:
        read_prompts(None, path)
    assert fragment in str(info.value)


def test_bad_prompts_are_refused_before_any_model_loads(tmp_path):
    missing = tmp_path / "nowhere"  # the source does not exist either: the prompts are checked first
    refused_cleanly(["generate", str(missing), "--prompt", "  "], 2, "--prompt is empty")
    refused_cleanly(["generate", str(missing), "--file", str(tmp_path / "none.txt")], 2, "none.txt does not exist")
    refused_cleanly(["generate", str(missing), "--file", str(tmp_path)], 2, "is a directory")
