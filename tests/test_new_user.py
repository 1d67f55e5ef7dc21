"""What a new user meets first: a dry run that says what it checked, the plan and console of a CPU run, the
parameter counts, the help, the key reference, and commands that answer without loading the training stack."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
from helpers import REPO, TIMEOUT, refused_cleanly, run_cli, tiny_recipe

from qlora_trainer import cli
from qlora_trainer.config.recipe_keys import format_keys, recipe_keys

DEMO_TRAIN = REPO / "recipes" / "data" / "complaints-train.jsonl"


# ---------------------------------------------------------------- the dry run


def test_a_dry_run_reads_every_row_as_the_run_would(tiny_model_dir, tmp_path):
    rows = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()[:8]
    rows[1] = json.dumps({"prompt": "Tweet: where is my card\nLabel:"})  # row 2 lacks its completion
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, data={"path": str(data)})
    line = refused_cleanly(["--recipe", str(recipe), "--dry-run", "--output-dir", str(tmp_path / "run")], 2,
                           f"{data}:2", watch=[tmp_path])
    assert "completion" in line


def test_a_clean_dry_run_says_what_it_read(tiny_model_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir)
    assert cli.main(["--recipe", str(recipe), "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Dry run: checked the recipe, the model's config, the plan and the estimate, 32 training rows" in out
    assert "not checked" not in out and not (tmp_path / "run").exists()


def test_a_dry_run_names_what_it_could_not_check_here(tmp_path, capsys):
    argv = ["--recipe", "llama7b-r8", "--dry-run", "--output-dir", str(tmp_path / "run"),
            "--set", "data.path=nobody/no-such-dataset"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    gaps = [line.strip() for line in out.splitlines() if line.strip().startswith("not checked:")]
    assert any("no CUDA GPU is visible" in g and "exit 3" in g for g in gaps), gaps  # the real run here stops
    assert any("'nobody/no-such-dataset': a hub dataset not in the local cache" in g for g in gaps), gaps
    assert any("tokenizer of 'huggyllama/llama-7b'" in g for g in gaps), gaps
    assert not (tmp_path / "run").exists()


def test_a_multi_gpu_dry_run_estimates_the_launch_it_is_written_for(tmp_path, capsys):
    assert cli.main(["estimate", "--recipe", "llama2-70b-fsdp-2x24gb", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["total_gib"]
    assert cli.main(["--recipe", "llama2-70b-fsdp-2x24gb", "--dry-run", "--output-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"^  total\s+([\d.]+) GiB", out, re.M).group(1))
    assert total == pytest.approx(expected, abs=0.001) and "per GPU of 2 under FSDP" in out


# ---------------------------------------------------------------- a CPU run's plan and console


def test_the_cpu_plan_says_what_it_trains_with(tiny_model_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, train={"micro_batch_size": 8})
    assert cli.main(["--recipe", str(recipe), "--dry-run", "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    auto = next(line for line in out.splitlines() if line.startswith("  auto "))
    assert "micro-batch" not in auto  # the recipe set it (8): the auto line names only what auto chose
    assert "8 x 1 accumulation = 8 sequences/step" in out
    assert "cuda_context" not in out and "Memory: training on the CPU" in out
    assert "adamw_bnb_8bit on the CPU" in out  # the paged optimizer, as the CPU runs it


def test_plan_estimate_and_peft_count_the_same_parameters(tiny_model_dir):
    from peft import get_peft_model

    from qlora_trainer.config.recipe import LoraSection, ModelSection, QuantizationSection
    from qlora_trainer.estimate.memory import Settings, estimate
    from qlora_trainer.estimate.shape_lookup import shape_for_model
    from qlora_trainer.loading.model import load_base_model, lora_config, parameter_report

    lora = LoraSection(r=4, alpha=8)
    model = get_peft_model(load_base_model(ModelSection(name_or_path=str(tiny_model_dir)), QuantizationSection(), "cpu"),
                           lora_config(lora))
    peft_counts = parameter_report(model)
    est = estimate(shape_for_model(str(tiny_model_dir)), Settings(rank=4))
    assert (est.trainable_params, est.all_params) == (peft_counts["trainable_params"], peft_counts["total_params"])


def test_the_demo_console_is_lines_a_person_reads(demo_run):
    out = (demo_run / "stdout.txt").read_text(encoding="utf-8")
    steps = [line for line in out.splitlines() if re.search(r"step \d+/120  loss \d+\.\d{3}", line)]
    assert len(steps) >= 12, out[-2000:]  # every 10 steps, and the first
    assert "{'loss'" not in out and "'learning_rate'" not in out  # no raw trainer dicts
    assert "Held-out exact match after training: " in out


def test_the_console_has_no_library_noise(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, eval={"exact_match": True, "max_samples": 4},
                         data={"eval_path": str(REPO / "recipes" / "data" / "complaints-heldout.jsonl")},
                         train={"max_steps": 2, "save_steps": 2})
    result = run_cli("--recipe", str(recipe), "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    both = result.stdout + result.stderr
    for noise in ("FutureWarning", "Paged optimizers are not supported", "kernels-community", "Tokenizing train dataset",
                  "Adding EOS", "an autograd kernel was not registered"):
        assert noise not in both, noise


# ---------------------------------------------------------------- help and the key reference


def test_the_top_level_help_shows_the_training_options_and_examples():
    result = run_cli("--help")
    assert result.returncode == 0
    for fragment in ("--recipe", "--dry-run", "--resume", "--gpu-memory", "estimate", "keys",
                     "python -m qlora_trainer --recipe tiny-demo"):
        assert fragment in result.stdout, fragment


def test_generate_help_shows_defaults():
    text = " ".join(run_cli("generate", "--help").stdout.split())  # argparse wraps lines anywhere
    assert "at most (default: 128)" in text and "greedily (default: 0.0)" in text and "mass (default: 1.0)" in text


def test_keys_lists_every_schema_field_with_its_default(capsys):
    assert cli.main(["keys"]) == 0
    out = capsys.readouterr().out
    for key in recipe_keys():
        assert re.search(rf"^{re.escape(key.name)}\s+.*default {re.escape(key.default)}$", out, re.M), key.name
    names = [k.name for k in recipe_keys()]
    assert {"train.seq_len", "lora.r", "data.columns", "distributed.cpu_offload"} <= set(names)
    assert next(k for k in recipe_keys() if k.name == "train.seq_len").default == "2048"


def test_the_key_reference_in_docs_is_the_schemas():
    documented = (REPO / "docs" / "recipe-keys.md").read_text(encoding="utf-8")
    assert format_keys(recipe_keys(), markdown=True) in documented, \
        "docs/recipe-keys.md is stale: python -m qlora_trainer keys --markdown"


# ---------------------------------------------------------------- commands that do not need the training stack


def test_estimate_and_recipes_import_no_training_library(tmp_path):
    """`estimate` and `recipes` read shapes from the cache once they have been read: no torch, transformers,
    bitsandbytes, PEFT, TRL or liger import (seconds on a laptop)."""
    env = {"QLORA_TRAINER_CACHE": str(tmp_path)}
    heavy = ("torch", "transformers", "bitsandbytes", "peft", "trl", "liger_kernel")
    for argv in (["estimate", "--recipe", "llama7b-r8", "--gpu-memory", "12"], ["recipes"]):
        assert run_cli(*argv, env=env).returncode == 0  # fills the shape cache
        code = ("import sys; from qlora_trainer import cli; code = cli.main(sys.argv[1:]); "
                f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
        result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                                env={**__import__("os").environ, **env}, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == "LOADED []", (argv, result.stdout[-300:])


def test_a_cached_shape_is_the_shape(tmp_path, monkeypatch):
    from qlora_trainer.estimate.memory import model_shape
    from qlora_trainer.estimate.shape_lookup import shape_for_model
    from qlora_trainer.loading.architectures import load_architecture

    monkeypatch.setenv("QLORA_TRAINER_CACHE", str(tmp_path))
    for name in ("llama-2-7b", "gemma-2-9b", "qwen3-8b"):
        first, second = shape_for_model(name), shape_for_model(name)
        assert first == second == model_shape(load_architecture(name), name)
    entries = list((tmp_path / "shapes").glob("*.json"))
    assert len(entries) == 3
    for entry in entries:
        entry.write_text("{damaged", encoding="utf-8")  # a damaged entry is read again, not trusted
    assert shape_for_model("llama-2-7b") == model_shape(load_architecture("llama-2-7b"), "llama-2-7b")
    assert dataclasses.asdict(shape_for_model("llama-2-7b"))["linears"]


def test_flag_choices_are_the_schemas():
    import typing

    from qlora_trainer.config.recipe import DistributedSection, ExportSection, TrainSection

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    found = {a.dest: a.choices for name in ("estimate", "export") for a in subs[name]._actions if a.choices}
    assert found["optimizer"] == list(typing.get_args(TrainSection.model_fields["optimizer"].annotation))
    assert found["strategy"] == list(typing.get_args(DistributedSection.model_fields["strategy"].annotation))
    assert found["dtype"] == list(typing.get_args(ExportSection.model_fields["dtype"].annotation))
