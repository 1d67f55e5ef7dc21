"""Preference data and the method schema: train.method with its typed section, preference pairs and KTO's
labelled rows detected by `format: auto`, every bad row named in one line with its file, line and field."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, refused_cleanly

from qlora_trainer.config.recipe_files import dump_recipe, load_yaml, validate
from qlora_trainer.dataset.data import load_data
from qlora_trainer.dataset.preference_rows import unpaired
from qlora_trainer.dataset.sequence_fit import fit_to_tokenizer, token_lengths
from qlora_trainer.errors import UserError
from qlora_trainer.loading.model import load_tokenizer

PAIR = {"prompt": "Tweet: my bill is late\nLabel:", "chosen": " complaint", "rejected": " no complaint"}
TURNS_PAIR = {"prompt": [{"role": "user", "content": "my bill"}],
              "chosen": [{"role": "assistant", "content": "sorry"}],
              "rejected": [{"role": "assistant", "content": "so?"}]}
LABELLED = {"prompt": "Tweet: great app\nLabel:", "completion": " no complaint", "label": True}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe_for(path, method="dpo", model="m", **data):
    return validate({"model": {"name_or_path": str(model)}, "data": {"path": str(path), **data},
                     "train": {"method": method, "micro_batch_size": 2}}, "test")


def test_method_defaults_to_sft_and_only_its_section_is_saved():
    recipe = validate({"model": {"name_or_path": "m"}, "data": {"path": "x"}}, "test")
    assert recipe.train.method == "sft"
    assert not {"dpo", "orpo", "kto"} & set(load_yaml(dump_recipe(recipe)))
    dpo = validate({"model": {"name_or_path": "m"}, "data": {"path": "x"}, "train": {"method": "dpo"},
                    "dpo": {"beta": 0.25, "loss_type": "ipo"}}, "test")
    saved = load_yaml(dump_recipe(dpo))
    assert saved["dpo"] == {"beta": 0.25, "loss_type": "ipo", "label_smoothing": 0.0}
    assert "kto" not in saved and "orpo" not in saved
    assert validate(saved, "again") == dpo, "a saved recipe loads back as the same recipe"


@pytest.mark.parametrize("raw, fragment", [
    ({"train": {"method": "sft"}, "dpo": {"beta": 0.2}}, "the dpo section is set but train.method is sft"),
    ({"train": {"method": "dpo"}, "kto": {"beta": 0.2}}, "the kto section is set but train.method is dpo"),
    ({"train": {"method": "dpo"}, "dpo": {"loss_type": "simpo"}}, "dpo.loss_type"),
    ({"train": {"method": "dpo"}, "dpo": {"beta": 0}}, "dpo.beta"),
    ({"train": {"method": "kto", "micro_batch_size": 1}}, "train.micro_batch_size must be 2 or more"),
    ({"train": {"method": "orpo", "packing": True}}, "train.packing and train.padding_free are for sft rows"),
    ({"train": {"method": "ppo"}}, "train.method"),
    ({"train": {"method": "dpo"}, "data": {"path": "x", "format": "prompt_completion"}}, "needs preference rows"),
    ({"train": {"method": "sft"}, "data": {"path": "x", "format": "kto"}}, "set train.method: dpo, orpo or kto"),
    ({"train": {"method": "dpo"}, "data": {"path": "x", "eval_fraction": 0.1}, "eval": {"exact_match": True}},
     "eval.exact_match is for sft runs"),
])
def test_method_problems_are_named(raw, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        validate({"model": {"name_or_path": "m"}, "data": {"path": "x"}, **raw}, "test")


def test_auto_detects_pairs_and_labelled_rows(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [PAIR, dict(PAIR, prompt="Tweet: fine\nLabel:")])
    data = load_data(recipe_for(pairs).data, 0, "dpo")
    assert data.format == "preference" and data.train.to_list()[0] == PAIR
    turns = write_jsonl(tmp_path / "t.jsonl", [TURNS_PAIR])
    assert load_data(recipe_for(turns, "orpo").data, 0, "orpo").train.to_list() == [TURNS_PAIR]
    labelled = write_jsonl(tmp_path / "k.jsonl", [LABELLED, dict(LABELLED, label=False)])
    section = recipe_for(labelled, "kto").data
    data = load_data(section, 0, "kto")
    assert data.format == data.recipe_format == "kto", "the resolved recipe records it"
    # KTO trains on pairs too: each pair becomes a desirable and an undesirable row.
    rows = unpaired(load_data(recipe_for(pairs, "kto").data, 0, "kto").train).to_list()
    assert rows[:2] == [{"prompt": PAIR["prompt"], "completion": " complaint", "label": True},
                        {"prompt": PAIR["prompt"], "completion": " no complaint", "label": False}]


def test_rows_of_another_method_name_the_key(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [PAIR])
    with pytest.raises(UserError, match="prompt/chosen/rejected pairs but train.method is sft; set train.method"):
        load_data(recipe_for(pairs, "sft").data, 0, "sft")
    labelled = write_jsonl(tmp_path / "k.jsonl", [LABELLED])
    with pytest.raises(UserError, match="train.method dpo trains on prompt/chosen/rejected pairs, but the rows are kto"):
        load_data(recipe_for(labelled).data, 0, "dpo")
    sft_rows = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match="train.method dpo needs rows with prompt\\+chosen\\+rejected"):
        load_data(recipe_for(sft_rows).data, 0, "dpo")
    # data.columns maps other names, as for SFT rows.
    renamed = write_jsonl(tmp_path / "r.jsonl", [{"question": "q", "good": "yes", "bad": "no"}])
    section = recipe_for(renamed, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}).data
    assert load_data(section, 0, "dpo").train.to_list() == [{"prompt": "q", "chosen": "yes", "rejected": "no"}]


@pytest.mark.parametrize("row, method, fragment", [
    (dict(PAIR, chosen=3), "dpo", "p.jsonl:2: field 'chosen' must be a string or a list of messages, got int"),
    ({"prompt": "a", "chosen": None, "rejected": "b"}, "dpo", "p.jsonl:2: field 'chosen' must be a string, got nothing"),
    (dict(PAIR, rejected=PAIR["chosen"]), "dpo", "p.jsonl:2: fields 'chosen' and 'rejected' are the same answer"),
    (dict(TURNS_PAIR, rejected=" no"), "dpo", "p.jsonl:2: fields prompt, chosen, rejected mix strings and message lists"),
    (dict(TURNS_PAIR, chosen=[{"role": "user", "content": "x"}]), "dpo", "field 'chosen' has no assistant turn"),
    (dict(LABELLED, label="yes"), "kto", "p.jsonl:2: field 'label' must be true (desirable) or false (undesirable), got str"),
    ("{not json", "dpo", "p.jsonl:2: invalid JSON"),
])
def test_bad_preference_rows_are_named(tmp_path, row, method, fragment):
    first = LABELLED if method == "kto" else PAIR
    path = write_jsonl(tmp_path / "p.jsonl", [first, row])
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_data(recipe_for(path, method).data, 0, method)


def test_pairs_of_strings_and_turns_cannot_mix_in_a_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, TURNS_PAIR])
    with pytest.raises(UserError, match="p.jsonl:2: field 'prompt' is a message list, unlike the first row"):
        load_data(recipe_for(path).data, 0, "dpo")


def test_a_pair_is_as_long_as_its_longer_answer(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(validate({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"path": "x"}}, "t").model)
    long_rejected = dict(PAIR, rejected=" no complaint at all, not one, never")
    total, start = token_lengths(long_rejected, tokenizer, None, False)
    alone, prompt_end = token_lengths({"prompt": PAIR["prompt"], "completion": long_rejected["rejected"]}, tokenizer, None, False)
    assert (total, start) == (alone, prompt_end) and total > token_lengths(PAIR, tokenizer, None, False)[0]
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, long_rejected])
    recipe = recipe_for(path, model=tiny_model_dir, overlong="drop")
    data = fit_to_tokenizer(load_data(recipe.data, 0, "dpo"), recipe.data, tokenizer, total - 1, "tiny")
    assert data.train.to_list() == [PAIR] and data.stats["train_dropped_rows"] == 1


def test_cli_refuses_bad_pairs_in_one_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR, dict(PAIR, chosen=[1])])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: demo:tiny-llama}}\ndata: {{path: {path}}}\ntrain: {{method: dpo, seq_len: 64}}\n")
    refused_cleanly(["--recipe", str(recipe), "--output-dir", str(tmp_path / "run")], 2,
                    "p.jsonl:2: field 'chosen[0]' needs string 'role' and 'content' fields", [tmp_path])


def test_shipped_demo_pairs_are_what_the_tool_writes(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("complaints-pref-train.jsonl", "complaints-pref-heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "recipes" / "data" / name).read_bytes()
    train = [json.loads(line)["prompt"] for line in (tmp_path / "complaints-pref-train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line)["prompt"] for line in (tmp_path / "complaints-pref-heldout.jsonl").read_text().splitlines()]
    assert not set(train) & set(heldout), "held-out pairs are other tweets"


def test_the_plan_names_the_method_and_its_reference(tmp_path):
    from helpers import run_cli

    result = run_cli("--recipe", "tiny-dpo", "--dry-run", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("  method"))
    assert "dpo: beta 0.1, loss_type sigmoid" in line and "one pair" in line and "the base, adapter disabled" in line
    assert not (tmp_path / "run").exists()
