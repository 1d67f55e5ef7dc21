"""A corpus of bad recipes, and random overrides: every bad input ends in exit 2 with one line naming the
culprit, never a traceback, and never leaves a run directory behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_trainer.cli import main
from qlora_trainer.config.recipe_files import dump_recipe, load_recipe, validate
from qlora_trainer.errors import UserError

CORPUS = Path(__file__).parent / "bad_recipes"


def expected_fragment(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must say what error it expects"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_recipe_exits_2_with_one_line(path, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(CORPUS)
    code = main(["--recipe", str(path), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qlora-trainer: error: ")]
    assert len(lines) == 1, err
    assert expected_fragment(path) in lines[0]
    assert not (tmp_path / "run").exists()


KEYS = ["model.name_or_path", "model.trust_remote_code", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
        "lora.use_dora", "train.seq_len", "train.max_steps", "train.learning_rate", "train.optimizer",
        "train.global_batch_size", "train.micro_batch_size", "quantization.quant_type", "data.format", "data.eval_fraction",
        "lora.rnak", "trian.seq_len", "train", "lora.r.x", "", "export.dtype"]
VALUES = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str), st.text(max_size=12),
                   st.sampled_from(["true", "no", "null", "[a, b]", "{x: 1}", "[", "'", "2e-4", "-1", "0", "all-linear"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_random_overrides_are_accepted_or_refused_cleanly(pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        recipe, _ = load_recipe("tiny-demo", overrides)
    except UserError as err:
        assert "\n" not in str(err) and str(err)
    else:  # an accepted recipe is saved as recipe.yaml, which must load back as the same recipe
        assert validate(yaml.safe_load(dump_recipe(recipe)), "recipe.yaml") == recipe
