"""The recipe schema: every shipped recipe validates, bad recipes fail with one line naming key and fix."""

from __future__ import annotations

import pytest

from qlora_trainer.config.recipe_files import launch_command, load_recipe, shipped_recipe_names, shipped_recipes_dir
from qlora_trainer.errors import UserError

MINIMAL = """\
model:
  name_or_path: demo:tiny-llama
data:
  path: rows.jsonl
"""


def error_of(path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(str(path), list(overrides))
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


@pytest.mark.parametrize("name", shipped_recipe_names())
def test_every_shipped_recipe_validates_and_documents_its_command(name, monkeypatch):
    monkeypatch.chdir(shipped_recipes_dir().parent)
    recipe, path = load_recipe(name)
    assert path.read_text().splitlines()[0] == f"# {launch_command(recipe, name)}"  # as run from the repository root
    assert recipe.description, "shown by `qlora-trainer recipes`"


def test_required_recipes_are_shipped():
    assert {"tiny-demo", "llama7b-r8"} <= set(shipped_recipe_names())
    assert len(shipped_recipe_names()) >= 6


def test_demo_data_paths_resolve_relative_to_the_recipe():
    recipe, _ = load_recipe("tiny-demo")
    assert recipe.data.path == str((shipped_recipes_dir() / "data" / "complaints-train.jsonl").resolve())


def test_defaults_follow_the_qlora_paper(write_recipe):
    recipe, _ = load_recipe(str(write_recipe(MINIMAL)))
    assert (recipe.quantization.quant_type, recipe.quantization.double_quant) == ("nf4", True)
    assert recipe.quantization.compute_dtype == "bfloat16"
    assert recipe.lora.target_modules == "all-linear" and recipe.lora.dtype == "bfloat16"
    assert recipe.train.optimizer == "paged_adamw_8bit" and recipe.train.gradient_checkpointing
    assert recipe.model.trust_remote_code is False


def test_unknown_key_names_the_nearest_key_and_its_line(write_recipe):
    path = write_recipe(MINIMAL + "lora:\n  rnak: 8\ntrain:\n  learning_rat: 0.1\n")
    message = error_of(path)
    assert "2 problems" in message
    assert "lora.rnak (line 6): unknown key" in message
    assert "train.learning_rat (line 8): unknown key, did you mean train.learning_rate?" in message
    assert str(path) in message


def test_peft_style_names_point_to_ours(write_recipe):
    message = error_of(write_recipe(MINIMAL + "lora:\n  lora_alpha: 8\n"))
    assert "lora.lora_alpha (line 6): unknown key, did you mean lora.alpha?" in message


def test_unknown_section_is_named(write_recipe):
    assert "trian (line 5): unknown key, did you mean train?" in error_of(write_recipe(MINIMAL + "trian:\n  seed: 1\n"))


def test_wrong_types_and_ranges_name_key_and_value(write_recipe):
    path = write_recipe(MINIMAL + "lora:\n  r: 0\n  alpha: 0\n  dropout: 1.5\ntrain:\n  seq_len: long\n  optimizer: sgd\n")
    message = error_of(path)
    assert "5 problems" in message
    assert "lora.r (line 6): Input should be greater than 0 (got 0)" in message
    assert "lora.alpha (line 7): Input should be greater than 0" in message
    assert "lora.dropout (line 8): Input should be less than 1 (got 1.5)" in message
    assert "train.seq_len (line 10): Input should be a valid integer" in message
    assert "train.optimizer (line 11): Input should be 'paged_adamw_8bit'" in message


def test_missing_required_key(write_recipe):
    assert "data: required key is missing" in error_of(write_recipe("model:\n  name_or_path: x\n"))


def test_yaml_syntax_error_names_the_line(write_recipe):
    path = write_recipe(MINIMAL + "train:\n  seq_len: [1, 2\n  seed: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}: line ") and "YAML syntax error" in message


def test_a_recipe_must_be_a_mapping(write_recipe):
    assert "a recipe is a YAML mapping" in error_of(write_recipe("- just\n- a list\n"))


def test_unknown_recipe_name_suggests_the_nearest():
    with pytest.raises(UserError, match="unknown recipe 'tiny-dmo': did you mean 'tiny-demo'"):
        load_recipe("tiny-dmo")


def test_missing_recipe_file():
    with pytest.raises(UserError, match="recipe file nowhere.yaml does not exist"):
        load_recipe("nowhere.yaml")


def test_set_coerces_types(write_recipe):
    recipe, _ = load_recipe(str(write_recipe(MINIMAL)), [
        "train.max_steps=50", "train.learning_rate=3e-4", "lora.use_dora=true",
        "lora.target_modules=[q_proj, v_proj]", "model.revision=main", "lora.alpha=8.5"])
    assert recipe.train.max_steps == 50
    assert recipe.train.learning_rate == pytest.approx(3e-4)
    assert recipe.lora.use_dora is True
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.model.revision == "main"
    assert recipe.lora.alpha == 8.5


def test_set_rejects_unknown_keys_and_bad_values(write_recipe):
    path = write_recipe(MINIMAL)
    assert "train.max_step: unknown key, did you mean train.max_steps?" in error_of(path, ["train.max_step=5"])
    assert "train.max_steps: Input should be a valid integer" in error_of(path, ["train.max_steps=many"])
    assert "expected KEY=VALUE" in error_of(path, ["train.max_steps"])


def test_set_path_stays_relative_to_the_working_directory(write_recipe):
    recipe, _ = load_recipe(str(write_recipe(MINIMAL)), ["data.path=elsewhere.jsonl"])
    assert recipe.data.path == "elsewhere.jsonl"


def test_global_batch_derives_accumulation(write_recipe):
    recipe, _ = load_recipe(str(write_recipe(MINIMAL)), ["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert recipe.train.accumulation_for(4) == 8
    assert recipe.train.accumulation_for(4, world_size=2) == 4
    message = error_of(write_recipe(MINIMAL), ["train.global_batch_size=10", "train.micro_batch_size=4"])
    assert "train.global_batch_size (10) must be a multiple of train.micro_batch_size (4)" in message


def test_max_steps_zero_is_refused(write_recipe):
    assert "train.max_steps must be a positive number of steps or -1" in error_of(write_recipe(MINIMAL), ["train.max_steps=0"])
