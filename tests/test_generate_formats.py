"""`generate RUN --prompt TEXT` gives the model the text training put before an answer: for a run on conversational
rows (prompt/completion or preference rows of chat turns, messages rows), the prompt rendered with the chat template
the run trained with, not the prompt as typed. Tiny runs of one step train on CPU in-process."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import resolved_on_cpu, tiny_recipe

import qlora_trainer.deploy.generate as generate_module
from qlora_trainer.cli import main
from qlora_trainer.config.recipe_files import load_recipe
from qlora_trainer.dataset.data import load_data
from qlora_trainer.dataset.sequence_fit import fit_to_tokenizer
from qlora_trainer.loading.model import load_base_model
from qlora_trainer.training.trainer_setup import build_trainer

TWEETS = [("my bill is late again", "complaint"), ("love the new app", "no complaint"),
          ("still no refund", "complaint"), ("great support today", "no complaint")]
# Everything `auto` settled as on the CPU, so that the saved recipe rebuilds the same trainer.
SETTLED = {"max_steps": 1, "micro_batch_size": 4, "seq_len": 256, "save_steps": 100, "gradient_checkpointing": True,
           "activation_offloading": False, "packing": False, "padding_free": False, "kernels": "none"}


def user(text):
    return [{"role": "user", "content": text}]


def answer(text):
    return [{"role": "assistant", "content": text}]


def trained_run(root, model_dir, rows, method="sft", **data) -> object:
    """Train one step on `rows` in this process; returns the run directory."""
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = tiny_recipe(root / "recipe.yaml", model_dir, data={"path": str(path), "format": "auto", **data},
                         train={**SETTLED, "method": method})
    assert main(["--recipe", str(recipe), "--output-dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory):
    """Prompt/completion rows of chat turns, with the Alpaca chat template: unlike the tokenizer's own, so a prompt
    rendered with the base's template (or none) cannot pass for the one training used."""
    rows = [{"prompt": user(f"Tweet: {t}"), "completion": answer(label)} for t, label in TWEETS]
    return trained_run(tmp_path_factory.mktemp("chat"), tiny_model_dir, rows, chat_template="alpaca")


@pytest.fixture
def fed(monkeypatch):
    """Run `generate` on the command line; returns the texts it handed the model, with the tokenizer it used."""

    def run(*argv):
        seen = []
        original = generate_module.generate

        def spy(model, tokenizer, text, options):
            seen.append((text, tokenizer))
            return original(model, tokenizer, text, options)

        monkeypatch.setattr(generate_module, "generate", spy)
        assert main(["generate", *map(str, argv), "--max-new-tokens", "1"]) == 0
        return seen

    return run


def test_generate_gives_a_conversational_run_the_prompt_training_tokenized(chat_run, fed, tmp_path):
    recipe, _ = load_recipe(str(chat_run / "recipe.yaml"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_run / "adapter")  # as training saved it, template included
    data = fit_to_tokenizer(load_data(recipe.data, seed=0), recipe.data, tokenizer, recipe.train.seq_len, "tiny")
    base = load_base_model(recipe.model, recipe.quantization, "cpu")
    trainer = build_trainer(resolved_on_cpu(recipe, data), base, tokenizer, data, tmp_path, "cpu")
    row = trainer.train_dataset[0]  # TRL's own tokenization of the first training row
    first_label = next(i for i, label in enumerate(row["labels"]) if label != -100)
    prompt_ids = row["input_ids"][:first_label]
    typed = data.train[0]["prompt"][0]["content"]

    [(text, used)] = fed(chat_run, "--prompt", typed)
    assert text.startswith("Below is an instruction") and text.endswith(f"### Instruction:\n{typed}\n\n### Response:\n")
    assert used(text)["input_ids"] == prompt_ids, "generate's input is exactly the prompt tokens training saw"


def test_a_summary_from_before_the_flag_still_names_a_conversational_run(chat_run, fed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chat_run, run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary.pop("data_conversational") is True
    (run / "summary.json").write_text(json.dumps(summary))
    [(text, _)] = fed(run, "--prompt", "hi")
    assert text.endswith("### Instruction:\nhi\n\n### Response:\n")


@pytest.mark.parametrize("kind", ["preference", "messages"])
def test_other_conversational_runs_generate_from_their_chat_template(kind, tiny_model_dir, tmp_path, fed):
    """A DPO run on pairs whose prompt is a conversation (TRL renders it with the generation prompt), and a
    messages run (which generate already rendered): the tokenizer's own ChatML template."""
    if kind == "preference":
        rows = [{"prompt": user(t), "chosen": answer(label), "rejected": answer("unsure")} for t, label in TWEETS]
        run = trained_run(tmp_path, tiny_model_dir, rows, method="dpo")
    else:
        run = trained_run(tmp_path, tiny_model_dir, [{"messages": user(t) + answer(label)} for t, label in TWEETS])
    [(text, tokenizer)] = fed(run, "--prompt", "my bill")
    assert text == tokenizer.apply_chat_template(user("my bill"), add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nmy bill<|im_end|>\n<|im_start|>assistant\n"


def test_plain_prompt_completion_runs_still_generate_from_the_prompt_as_written(tiny_model_dir, tmp_path, fed):
    rows = [{"prompt": f"Tweet: {t}\nLabel:", "completion": f" {label}"} for t, label in TWEETS]
    run = trained_run(tmp_path, tiny_model_dir, rows)
    assert json.loads((run / "summary.json").read_text())["data_conversational"] is False
    [(text, _)] = fed(run, "--prompt", "Tweet: hi\\nLabel:")
    assert text == "Tweet: hi\nLabel:"
