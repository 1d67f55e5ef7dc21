"""Chat templates for conversational rows: which template a run uses, and the ones we ship for base models.

TRL's `assistant_only_loss` needs a template with `{% generation %}` markers around the assistant turns. A
tokenizer's template that has them is used as is; one that TRL knows how to patch is left for TRL to swap in
its training version; one that renders exactly like a template we ship gets our marked copy; anything else is
an error that names the recipe keys that fix it, rather than training on the prompts without saying so.
"""

from __future__ import annotations

from qlora_trainer.dataset.formats import ALPACA_INTRO
from qlora_trainer.errors import UserError

# ChatML as most ChatML models ship it; the assistant's <|im_end|> is inside the markers so the model learns to stop.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# The Stanford Alpaca prompt (as formats.py writes it for alpaca rows), turn by turn; each answer ends with the EOS
# token, so a base model whose vocabulary has no chat tokens still learns to stop.
ALPACA = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '" + ALPACA_INTRO + "' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' %}{{- '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '### Response:\n' }}{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}{{- '\n\n' }}"
    "{%- else %}{{- raise_exception('the alpaca template has no role ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\n' }}{%- endif %}"
)

TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA}

# A conversation that exercises every role and the generation prompt, to compare two templates' output.
_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]


def apply_chat_template(tokenizer, name: str | None, assistant_only: bool, model_name: str) -> tuple[str, str | None]:
    """Settle the template for conversational rows; set it on the tokenizer when it changes.

    Returns a description for the run output and the template TRL will tokenize with (None: the tokenizer's own).
    The tokenizer is saved with the adapter, so inference later renders prompts the way training did.
    """
    if name is not None:
        tokenizer.chat_template = TEMPLATES[name]
        return f"{name} (data.chat_template)", None
    if not tokenizer.chat_template:
        raise UserError(f"model {model_name} has no chat template, and conversational rows need one; set "
                        f"data.chat_template to one of {', '.join(TEMPLATES)} (or use prompt/completion rows)")
    if not assistant_only or _has_generation_markers(tokenizer.chat_template):
        return "the tokenizer's own", None
    training = _trl_training_template(tokenizer)
    if training is not None:
        return "the tokenizer's own (TRL's training version, which marks the assistant turns for the loss)", training
    for known, template in TEMPLATES.items():
        if renders_like(tokenizer, template):
            tokenizer.chat_template = template
            return f"{known} (the tokenizer's template renders exactly like it; our copy marks the assistant turns)", None
    raise UserError(f"the chat template of {model_name} does not mark the assistant turns ({{% generation %}}) and TRL "
                    "cannot patch it, so the loss cannot be limited to the answers; set data.chat_template to "
                    f"{' or '.join(TEMPLATES)}, or data.train_on_prompt: true to train on whole conversations")


def renders_like(tokenizer, template: str) -> bool:
    """Whether the tokenizer's template renders the probe conversation exactly as `template` does."""
    try:
        for messages, generation_prompt in ((_PROBE, False), (_PROBE[:4], True), (_PROBE[1:3], False)):
            ours = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
            theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            if ours != theirs:
                return False
    except Exception:  # a template may reject a role (e.g. no system turn); then it is not ours
        return False
    return True


def _has_generation_markers(template) -> bool:
    from trl.chat_template_utils import has_generation_markers

    return has_generation_markers(template)


def _trl_training_template(tokenizer) -> str | None:
    """TRL's training version of a template it knows, or None where TRL cannot patch this one."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # TRL raises for templates it does not know
        return None
