"""End to end on CPU with the real bitsandbytes, PEFT and TRL: the trainer learns, the base stays frozen,
the dtypes are what QLoRA prescribes, and the run directory holds every file DESIGN.md promises."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import REPO, resolved_on_cpu

from qlora_trainer.config.recipe_files import load_recipe
from qlora_trainer.dataset.data import load_data
from qlora_trainer.loading.model import frozen_dtypes, load_base_model, load_tokenizer, parameter_report
from qlora_trainer.training.train import RunOptions, train
from qlora_trainer.training.trainer_setup import build_trainer

DEMO_TRAIN = REPO / "recipes" / "data" / "complaints-train.jsonl"
DEMO_HELDOUT = REPO / "recipes" / "data" / "complaints-heldout.jsonl"


def tiny_recipe(write_recipe, model_dir, steps=12, extra=""):
    path = write_recipe(f"""\
description: test
model:
  name_or_path: {model_dir}
lora:
  r: 8
  alpha: 16
data:
  path: {DEMO_TRAIN}
  eval_path: {DEMO_HELDOUT}
  max_rows: 400
train:
  seq_len: 64
  micro_batch_size: 8
  gradient_accumulation_steps: 1
  max_steps: {steps}
  learning_rate: 2.0e-3
  logging_steps: 2
  eval_steps: 6
  save_steps: 6
{extra}""")
    return load_recipe(str(path))[0]


def test_qlora_training_updates_only_the_adapters(write_recipe, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(write_recipe, tiny_model_dir, steps=10)
    tokenizer = load_tokenizer(recipe.model)
    base = load_base_model(recipe.model, recipe.quantization, "cpu")
    data = load_data(recipe.data, seed=0)
    trainer = build_trainer(resolved_on_cpu(recipe, data), base, tokenizer, data, tmp_path / "run", "cpu")
    (tmp_path / "run").mkdir(exist_ok=True)

    params = dict(trainer.model.named_parameters())
    four_bit = {n: p for n, p in params.items() if p.dtype == torch.uint8}
    lora_b = {n: p for n, p in params.items() if "lora_B" in n}
    assert len(four_bit) == 2 * 7, "every linear layer of both blocks is 4-bit"
    assert all(type(p).__name__ == "Params4bit" and p.quant_state.quant_type == "nf4" for p in four_bit.values())
    assert all(p.quant_state.nested for p in four_bit.values()), "double quantization"
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for n, p in params.items() if "lora_" in n)
    assert set(frozen_dtypes(trainer.model).values()) == {"bfloat16"}, "embeddings, lm_head and norms stay 16-bit"
    assert trainer.args.activation_checkpointing and trainer.args.activation_checkpointing_kwargs == {"use_reentrant": False}
    # The recipe's paged 8-bit AdamW, unpaged on the CPU (bitsandbytes pages only in CUDA managed memory).
    assert trainer.args.optim == "adamw_bnb_8bit"

    frozen_before = {n: p.detach().clone() for n, p in four_bit.items()}
    embed_before = params["base_model.model.model.embed_tokens.weight"].detach().clone()
    lora_before = {n: p.detach().clone() for n, p in lora_b.items()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    assert losses[-1] < losses[0] * 0.85, f"loss should fall: {losses}"
    assert all(torch.equal(frozen_before[n], p) for n, p in four_bit.items()), "4-bit base weights changed"
    assert torch.equal(embed_before, params["base_model.model.model.embed_tokens.weight"])
    assert all(not torch.equal(lora_before[n], p) for n, p in lora_b.items()), "every LoRA B matrix trained"
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if "lora_" in n)


def test_trainable_parameter_count_is_exact(write_recipe, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(write_recipe, tiny_model_dir)
    base = load_base_model(recipe.model, recipe.quantization, "cpu")
    data = load_data(recipe.data, 0)
    trainer = build_trainer(resolved_on_cpu(recipe, data), base, load_tokenizer(recipe.model), data, tmp_path, "cpu")
    hidden, inter, kv, layers, r = 64, 128, 32, 2, 8  # kv = 2 kv heads x head_dim 16
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    expected = layers * sum(r * (i + o) for i, o in shapes)
    assert parameter_report(trainer.model)["trainable_params"] == expected


def test_adapter_dtype_float32_is_honoured(write_recipe, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(write_recipe, tiny_model_dir, extra="")
    recipe.lora.dtype = "float32"
    base = load_base_model(recipe.model, recipe.quantization, "cpu")
    data = load_data(recipe.data, 0)
    trainer = build_trainer(resolved_on_cpu(recipe, data), base, load_tokenizer(recipe.model), data, tmp_path, "cpu")
    assert {p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad} == {torch.float32}


def test_run_directory_holds_every_promised_file(write_recipe, tiny_model_dir, tmp_path):
    recipe = tiny_recipe(write_recipe, tiny_model_dir, steps=12, extra="eval:\n  exact_match: true\n  max_samples: 16\n  max_new_tokens: 4\n")
    run = tmp_path / "run"
    summary = train(recipe, RunOptions(recipe_name="test", output_dir=run))

    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 4, 6, 8, 10, 12]
    assert all(r["learning_rate"] is not None and r["tokens"] > 0 for r in train_rows)
    assert any(r.get("tokens_per_s") for r in train_rows)
    assert [r["step"] for r in rows if "eval_loss" in r] == [6, 12]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert not list((run / "adapter").glob("*.bin")), "safetensors only"
    assert (run / "adapter" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]

    saved = json.loads((run / "summary.json").read_text())
    assert saved == summary
    assert saved["steps"] == 12 and saved["final_loss"] < saved["first_loss"]
    assert saved["eval_loss"] == pytest.approx([r for r in rows if "eval_loss" in r][-1]["eval_loss"])
    assert saved["trainable_params"] > 0 and 0 < saved["trainable_percent"] < 100
    assert saved["frozen_dtypes"] == ["bfloat16"]
    assert saved["exact_match_before"] is not None and saved["exact_match_after"] is not None
    predicted = json.loads((run / "estimate.json").read_text())
    assert predicted["trainable_params"] == saved["trainable_params"], "the estimator counts what PEFT trains"
    assert saved["peak_memory_gib"] == {"estimated": predicted["total_gib"], "measured": None}


def test_demo_learns_the_task_from_the_command_line(demo_run):
    """The README's demo as shipped: held-out label accuracy must reach 90% from an untrained model's ~0%."""
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["exact_match_before"] < 0.2
    assert summary["exact_match_after"] >= 0.9
    stdout = (demo_run / "stdout.txt").read_text()
    assert "Held-out exact match after training" in stdout
    assert "trainable params: " in stdout


def test_an_eval_pass_before_training_leaves_the_gradients_unchanged(tiny_model_dir):
    """The held-out generation runs the model in eval mode without gradients before training. On CPUs with
    AVX512-BF16 bitsandbytes would then repack the 4-bit weights for a kernel with no backward, and the gradient
    through every base layer would be dropped: the first layer's LoRA gradient must be the same with and
    without that pass."""
    from peft import LoraConfig, get_peft_model

    from qlora_trainer.config.recipe import ModelSection, QuantizationSection

    def first_layer_lora_grad(eval_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        base = load_base_model(ModelSection(name_or_path=str(tiny_model_dir)), QuantizationSection(), "cpu")
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        ids = torch.randint(0, 300, (2, 16))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        name, param = next((n, p) for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n)
        return param.grad.detach().clone()

    assert torch.equal(first_layer_lora_grad(eval_first=True), first_layer_lora_grad(eval_first=False))
