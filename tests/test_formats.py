"""The row formats (dataset/formats.py), one by one: how each is detected, the fields it needs, its row checks, the
row TRL trains on, whether it is a conversation, and the prompt text `generate` gives the model for it."""

from __future__ import annotations

import pytest

from qlora_trainer.dataset import formats
from qlora_trainer.dataset.chat_templates import CHATML
from qlora_trainer.errors import UserError

USER = [{"role": "user", "content": "my bill"}]
ANSWER = [{"role": "assistant", "content": "sorry"}]
OTHER = [{"role": "assistant", "content": "no"}]


def answer_turns(text):
    return [{"role": "assistant", "content": text}]

# One good row of each format, as a file holds it.
ROWS = {
    "messages": {"messages": USER + ANSWER},
    "sharegpt": {"conversations": [{"from": "human", "value": "my bill"}, {"from": "gpt", "value": "sorry"}]},
    "prompt_completion": {"prompt": "Tweet: my bill\nLabel:", "completion": " complaint"},
    "alpaca": {"instruction": "Label it", "input": "my bill", "output": "complaint"},
    "text": {"text": "my bill is late"},
    "preference": {"prompt": "Tweet: my bill\nLabel:", "chosen": " complaint", "rejected": " no complaint"},
    "kto": {"prompt": "Tweet: my bill\nLabel:", "completion": " complaint", "label": True},
}
METHOD = {"preference": "dpo", "kto": "kto"}


class ChatTokenizer:
    """The one thing inference prompts need of a tokenizer: its chat template, rendered by transformers' own code."""

    chat_template = CHATML

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        from transformers.utils.chat_template_utils import render_jinja_template

        assert not tokenize
        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt)
        return rendered[0]


@pytest.mark.parametrize("name", ROWS)
def test_each_format_is_detected_from_its_own_fields(name):
    fmt = formats.detect_format(list(ROWS[name]), "auto", "rows.jsonl", METHOD.get(name, "sft"))
    assert fmt is formats.get(name) and fmt.name == name
    assert all(field in ROWS[name] for field in fmt.fields)
    assert fmt.problem(ROWS[name]) is None


def test_the_formats_are_data_formats_values_and_sharegpt_is_recorded_as_messages():
    assert list(formats.FORMATS) == ["messages", "prompt_completion", "alpaca", "text", "preference", "kto"]
    assert formats.get("sharegpt").fields == ("conversations",)
    assert formats.formats_for("sft") == ["messages", "prompt_completion", "alpaca", "text"]
    assert formats.formats_for("dpo") == formats.formats_for("orpo") == ["preference"]
    assert formats.formats_for("kto") == ["preference", "kto"]


def test_detection_prefers_the_methods_formats_and_checks_a_requested_one():
    both = ["prompt", "completion", "chosen", "rejected", "label"]
    assert formats.detect_format(both, "auto", "x", "sft").name == "prompt_completion"
    assert formats.detect_format(both, "auto", "x", "dpo").name == "preference"
    assert formats.detect_format(["messages", "conversations"], "auto", "x").name == "messages"
    with pytest.raises(UserError, match="data.format is alpaca but the rows have no instruction, output field"):
        formats.detect_format(["text"], "alpaca", "x")
    with pytest.raises(UserError, match="are prompt/chosen/rejected pairs but train.method is sft; set train.method: "
                                        "dpo, orpo or kto"):
        formats.detect_format(list(ROWS["preference"]), "auto", "x", "sft")
    with pytest.raises(UserError, match="train.method is sft; set train.method: kto$"):
        formats.detect_format(list(ROWS["kto"]), "kto", "x", "sft")
    with pytest.raises(UserError, match="method dpo trains on prompt/chosen/rejected pairs, but the rows are kto"):
        formats.detect_format(list(ROWS["kto"]), "auto", "x", "dpo")
    with pytest.raises(UserError, match="cannot tell the data format"):
        formats.detect_format(["question"], "auto", "x")


@pytest.mark.parametrize("name, row, fragment", [
    ("messages", {"messages": USER}, "no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from' is 'bot'"),
    ("prompt_completion", {"prompt": "p", "completion": None}, "field 'completion' must be a string, got nothing"),
    ("prompt_completion", {"prompt": 3, "completion": "c"}, "must be a string or a list of messages, got int"),
    ("alpaca", {"instruction": "i", "output": "o", "input": 3}, "field 'input' must be a string"),
    ("text", {"text": ["a"]}, "field 'text' must be a string, got list"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"}, "the same answer"),
    ("preference", {"prompt": USER, "chosen": "a", "rejected": OTHER}, "mix strings and message lists"),
    ("kto", {"prompt": "p", "completion": "c", "label": "yes"}, "field 'label' must be true (desirable)"),
])
def test_each_format_names_a_bad_rows_problem(name, row, fragment):
    assert fragment in formats.get(name).problem(row)


@pytest.mark.parametrize("name, trainer_row", [
    ("messages", {"messages": USER + ANSWER}),
    ("sharegpt", {"messages": USER + ANSWER}),
    ("prompt_completion", ROWS["prompt_completion"]),
    ("alpaca", {"prompt": formats.ALPACA_PROMPT_WITH_INPUT.format(instruction="Label it", input="my bill"),
                "completion": "complaint"}),
    ("text", ROWS["text"]),
    ("preference", ROWS["preference"]),
    ("kto", ROWS["kto"]),
])
def test_each_format_converts_to_the_row_trl_reads(name, trainer_row):
    fmt = formats.get(name)
    assert fmt.trainer_row({**ROWS[name], "extra": 1}) == trainer_row
    assert fmt.is_conversational(trainer_row) is (name in ("messages", "sharegpt"))
    assert not fmt.answer_is_empty(trainer_row)


@pytest.mark.parametrize("name, row", [
    ("prompt_completion", {"prompt": USER, "completion": ANSWER}),
    ("preference", {"prompt": USER, "chosen": ANSWER, "rejected": OTHER}),
    ("kto", {"prompt": USER, "completion": ANSWER, "label": False}),
])
def test_text_fields_may_be_chat_turns_one_kind_per_file(name, row):
    fmt = formats.get(name)
    turns = {k: [{**t, "name": "x"} for t in v] if isinstance(v, list) else v for k, v in row.items()}
    trainer_row = fmt.trainer_row(turns)
    assert trainer_row == row, "only role and content are kept"
    assert fmt.problem(row) is None and fmt.is_conversational(trainer_row)
    assert "is a message list, unlike the first row" in fmt.kind_problem(trainer_row, ROWS[name])
    assert "is a string, unlike the first row" in fmt.kind_problem(ROWS[name], trainer_row)
    assert fmt.kind_problem(trainer_row, trainer_row) is None


def test_an_empty_answer_is_seen_in_every_format():
    assert formats.MESSAGES.answer_is_empty({"messages": USER + answer_turns(" ")})
    assert formats.PROMPT_COMPLETION.answer_is_empty({"prompt": USER, "completion": answer_turns("")})
    assert formats.ALPACA.answer_is_empty({"prompt": "p", "completion": "  "})
    assert formats.TEXT.answer_is_empty({"text": "\n"})
    assert formats.PREFERENCE.answer_is_empty({"prompt": "p", "chosen": "a", "rejected": ""})
    assert formats.KTO.answer_is_empty({"prompt": "p", "completion": "", "label": True})


CHAT_PROMPT = "<|im_start|>user\nmy bill<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name, conversational, expected", [
    ("messages", False, CHAT_PROMPT),  # always a conversation, whatever the run records
    ("sharegpt", False, CHAT_PROMPT),
    ("prompt_completion", True, CHAT_PROMPT),
    ("preference", True, CHAT_PROMPT),
    ("kto", True, CHAT_PROMPT),
    ("prompt_completion", False, "my bill"),
    ("preference", False, "my bill"),
    ("kto", False, "my bill"),
    ("text", False, "my bill"),
    ("alpaca", False, formats.ALPACA_PROMPT.format(instruction="my bill")),
    (None, True, "my bill"),  # a merged export: nothing says how it was trained
    ("a-format-from-a-later-version", True, "my bill"),
])
def test_the_inference_prompt_is_what_training_put_before_an_answer(name, conversational, expected):
    assert formats.inference_prompt("my bill", ChatTokenizer(), name, conversational) == expected


def test_a_conversational_prompt_is_rendered_like_the_prompt_turns_of_a_training_row():
    tokenizer = ChatTokenizer()
    assert tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False) == CHAT_PROMPT
    assert formats.ALPACA.inference_prompt("x", tokenizer) == formats.ALPACA_PROMPT.format(instruction="x")
    tokenizer.chat_template = None  # no template anywhere: the prompt as given, as before
    assert formats.MESSAGES.inference_prompt("my bill", tokenizer) == "my bill"


def test_plain_rows_describe_their_template():
    assert formats.ALPACA.plain_template() == "the Alpaca prompt (rows converted to prompt/completion)"
    plain = formats.PROMPT_COMPLETION.plain_template()
    assert plain == "none (prompt_completion rows are used as written, EOS appended)"
