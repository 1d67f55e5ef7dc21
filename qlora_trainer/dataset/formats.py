"""The row formats training reads, one object each: the fields a row needs, the checks of one row, its conversion
to the row TRL trains on (`messages`, `prompt`/`completion`, `text`, or a preference row), and the text `generate`
must give the model for a user's prompt so that it sees what training showed it before an answer.

Prompt/completion, preference and KTO rows come in two variants, told apart by their rows: text fields (used as
written) or lists of chat turns (rendered with the chat template). Messages and ShareGPT rows are always
conversations; Alpaca and text rows never are.
"""

from __future__ import annotations

from qlora_trainer.dataset.row_fields import (
    SHAREGPT_ROLES,
    messages_problem,
    plain_turns,
    text_or_turns_problem,
    type_problem,
)
from qlora_trainer.errors import UserError

# The Stanford Alpaca prompt, so that alpaca rows train (and generate) the way the Alpaca models were trained.
ALPACA_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n")
ALPACA_PROMPT = ALPACA_INTRO + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                            "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                            "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def _empty(answer) -> bool:
    """An answer with no text: a blank string, or chat turns whose contents are all blank."""
    return not (answer.strip() if isinstance(answer, str) else "".join(t["content"] for t in answer).strip())


class RowFormat:
    """One row format. Subclasses set the class attributes and override what differs."""

    name: str  # as detected; ShareGPT rows are recorded in the recipe as data.format messages
    fields: tuple[str, ...]  # the fields a row needs; `auto` picks a format whose fields are all present
    methods: tuple[str, ...] = ("sft",)  # the train.method values that train on these rows
    described: str  # the rows, in words, for messages that name them
    conversational: bool | None = False  # None: the rows say (strings or lists of chat turns)
    either_fields: tuple[str, ...] = ()  # fields that hold a string or a list of turns, one kind per file
    answer_fields: tuple[str, ...] = ("completion",)  # the trainer row's answers, counted when empty
    # Whole conversations, whose loss TRL limits to the assistant turns (assistant_only_loss) unless
    # data.train_on_prompt; conversational prompt/completion rows are split into prompt and answer instead.
    assistant_turns: bool = False

    def problem(self, row: dict) -> str | None:
        """What is wrong with one raw row, or None."""
        for name in self.fields:
            if not isinstance(row.get(name), str):
                return type_problem(name, row.get(name), "a string")
        return None

    def trainer_row(self, row: dict) -> dict:
        """The row TRL trains on, with only the fields it reads."""
        return {name: row[name] for name in self.fields}

    def is_conversational(self, trainer_row: dict) -> bool:
        return self.conversational if self.conversational is not None else isinstance(trainer_row["prompt"], list)

    def kind_problem(self, trainer_row: dict, first: dict | None) -> str | None:
        """A field that is a message list where the file's first row has a string, or the other way round: one
        Arrow column must hold one type."""
        for name in self.either_fields if first is not None else ():
            if isinstance(trainer_row[name], list) != isinstance(first[name], list):
                kind = "a message list" if isinstance(trainer_row[name], list) else "a string"
                return f"field '{name}' is {kind}, unlike the first row; use one kind throughout the file"
        return None

    def answer_is_empty(self, trainer_row: dict) -> bool:
        return any(_empty(trainer_row[name]) for name in self.answer_fields)

    def plain_template(self) -> str:
        """How rows that are not conversations are shown to the model, for the run output and summary.json."""
        return f"none ({self.name} rows are used as written, EOS appended)"

    def inference_prompt(self, prompt: str, tokenizer, conversational: bool = False) -> str:
        """The text training put before an answer, for a user's `prompt`: the chat template with its generation
        prompt for conversations (the tokenizer saved with the adapter carries the template training used), the
        raw prompt for rows used as written. `conversational` is the run's variant where the rows decide it."""
        chat = self.conversational if self.conversational is not None else conversational
        if chat and tokenizer.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
        return prompt


class _Messages(RowFormat):
    name, fields, described, conversational, assistant_turns = "messages", ("messages",), "messages rows", True, True
    role_key, content_key, roles = "role", "content", None  # roles: ShareGPT's names for the chat roles

    def problem(self, row):
        return messages_problem(row.get(self.fields[0]), self.fields[0], self.role_key, self.content_key)

    def trainer_row(self, row):
        turns = row[self.fields[0]]
        return {"messages": [{"role": self.roles[t[self.role_key]] if self.roles else t[self.role_key],
                              "content": t[self.content_key]} for t in turns]}

    def answer_is_empty(self, trainer_row):
        return any(t["role"] == "assistant" and not t["content"].strip() for t in trainer_row["messages"])


class _ShareGpt(_Messages):
    name, fields, described = "sharegpt", ("conversations",), "ShareGPT conversations"
    role_key, content_key, roles = "from", "value", SHAREGPT_ROLES


class _Text(RowFormat):
    name, fields, described, answer_fields = "text", ("text",), "text rows", ("text",)


class _PromptCompletion(RowFormat):
    name, fields, described = "prompt_completion", ("prompt", "completion"), "prompt/completion rows"
    conversational, either_fields = None, ("prompt", "completion")

    def problem(self, row):
        for name in self.either_fields:
            problem = text_or_turns_problem(row, name, needs_assistant=name != "prompt")
            if problem:
                return problem
        return None

    def trainer_row(self, row):
        return {name: plain_turns(row[name]) if isinstance(row[name], list) else row[name] for name in self.fields}


class _Alpaca(RowFormat):
    """Converted to prompt/completion rows with the Alpaca prompt."""
    name, fields, described = "alpaca", ("instruction", "output"), "alpaca rows"

    def problem(self, row):
        problem = super().problem(row)
        if problem is None and row.get("input") is not None and not isinstance(row["input"], str):
            problem = type_problem("input", row["input"], "a string")
        return problem

    def trainer_row(self, row):
        template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        return {"prompt": template.format(instruction=row["instruction"], input=row.get("input") or ""),
                "completion": row["output"]}

    def plain_template(self):
        return "the Alpaca prompt (rows converted to prompt/completion)"

    def inference_prompt(self, prompt, tokenizer, conversational=False):
        return ALPACA_PROMPT.format(instruction=prompt)


class _Preference(_PromptCompletion):
    """Pairs for dpo, orpo and kto: one prompt, a chosen and a rejected answer."""
    name, fields, described = "preference", ("prompt", "chosen", "rejected"), "prompt/chosen/rejected pairs"
    methods, either_fields = ("dpo", "orpo", "kto"), ("prompt", "chosen", "rejected")
    answer_fields = ("chosen", "rejected")

    def problem(self, row):
        problem = super().problem(row)
        if problem is None and len({isinstance(row[name], list) for name in self.either_fields}) > 1:
            problem = f"fields {', '.join(self.either_fields)} mix strings and message lists; use one kind in a row"
        if problem is None and row["chosen"] == row["rejected"]:
            problem = "fields 'chosen' and 'rejected' are the same answer; a pair needs two different answers"
        return problem


class _Kto(_PromptCompletion):
    """KTO's unpaired rows: a prompt, an answer, and whether the answer is desirable."""
    name, fields, described = "kto", ("prompt", "completion", "label"), "prompt/completion/label rows"
    methods = ("kto",)

    def problem(self, row):
        problem = super().problem(row)
        if problem is None and not isinstance(row.get("label"), bool):
            problem = type_problem("label", row.get("label"), "true (desirable) or false (undesirable)")
        if problem is None and isinstance(row["prompt"], list) != isinstance(row["completion"], list):
            problem = f"fields {', '.join(self.either_fields)} mix strings and message lists; use one kind in a row"
        return problem


MESSAGES, SHAREGPT, PROMPT_COMPLETION, ALPACA, TEXT = _Messages(), _ShareGpt(), _PromptCompletion(), _Alpaca(), _Text()
PREFERENCE, KTO = _Preference(), _Kto()
# data.format's values, in the order `auto` tries them: supervised rows first, then the preference shapes.
FORMATS = {f.name: f for f in (MESSAGES, PROMPT_COMPLETION, ALPACA, TEXT, PREFERENCE, KTO)}
PREFERENCE_FORMATS = ("preference", "kto")


def get(name: str) -> RowFormat:
    """The format of a name as data.format or summary.json's data_format records it."""
    return SHAREGPT if name == "sharegpt" else FORMATS[name]


def find(name: str | None) -> RowFormat | None:
    """The format of a recorded name, or None for none (a merged export) or one this version does not know."""
    return get(name) if name in FORMATS or name == "sharegpt" else None


def formats_for(method: str) -> list[str]:
    return [name for name, f in FORMATS.items() if method in f.methods]


def detect_format(columns: list[str], requested: str, source: str, method: str = "sft") -> RowFormat:
    """The format of rows with these columns: data.format where it is set (checked), else the first format, among
    those train.method trains on, whose fields are all present."""
    sharegpt = "conversations" in columns and "messages" not in columns
    if sharegpt and requested in ("auto", "messages") and method == "sft":
        return SHAREGPT
    hint = "; map other column names with data.columns, e.g. {prompt: question, completion: answer}"
    if requested != "auto":
        missing = [f for f in FORMATS[requested].fields if f not in columns]
        if missing:
            raise UserError(f"{source}: data.format is {requested} but the rows have no {', '.join(missing)} field; "
                            f"columns are {', '.join(columns) or 'none'}{hint}")
        check_method(FORMATS[requested], method, source)
        return FORMATS[requested]
    # The method's own formats first; then the preference shapes, to name the key that fits rows of another method.
    for name in dict.fromkeys(formats_for(method) + list(PREFERENCE_FORMATS)):
        if all(f in columns for f in FORMATS[name].fields):
            check_method(FORMATS[name], method, source)
            return FORMATS[name]
    if method != "sft":
        wanted = " or ".join("+".join(FORMATS[f].fields) for f in formats_for(method))
        raise UserError(f"{source}: train.method {method} needs rows with {wanted}; the columns are "
                        f"{', '.join(columns) or '(none)'}; map other names with data.columns, e.g. {{chosen: good}}")
    raise UserError(f"{source}: cannot tell the data format from the columns {', '.join(columns) or '(none)'}; rows "
                    f"need messages, conversations, prompt+completion, instruction+output or text{hint}")


def check_method(fmt: RowFormat, method: str, source: str) -> None:
    """Refuse rows that the method cannot train on, naming the key that fixes it."""
    if method in fmt.methods:
        return
    if method == "sft":
        methods = ", ".join(fmt.methods[:-1]) + " or " + fmt.methods[-1] if len(fmt.methods) > 1 else fmt.methods[0]
        raise UserError(f"{source}: the rows are {fmt.described} but train.method is sft; set train.method: {methods}")
    wanted = " or ".join(FORMATS[f].described for f in formats_for(method))
    raise UserError(f"{source}: train.method {method} trains on {wanted}, but the rows are {fmt.name} rows; convert "
                    "the data (or map its columns with data.columns), or set train.method: sft")


def inference_prompt(prompt: str, tokenizer, data_format: str | None, conversational: bool = False) -> str:
    """The text to generate from for a run trained on `data_format` rows; the prompt as given where nothing says
    how the model was trained (a merged export, an adapter directory without its run)."""
    fmt = find(data_format)
    return prompt if fmt is None else fmt.inference_prompt(prompt, tokenizer, conversational)
