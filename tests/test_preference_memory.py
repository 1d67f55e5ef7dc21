"""The estimator's terms per training method, and the auto planner choosing with them: DPO and ORPO run two rows
per pair, DPO and KTO a reference forward that saves nothing for backward (counted on CPU through TRL's own loss),
ORPO the full logits; KTO never gets a micro-batch of one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import REPO, resolved_on_cpu, run_cli, tiny_recipe
from test_activation_memory import saved_bytes

from qlora_trainer.config.recipe_files import load_recipe, validate
from qlora_trainer.dataset.data import load_data
from qlora_trainer.dataset.sequence_fit import fit_to_tokenizer
from qlora_trainer.estimate import auto_settings, fit_rule
from qlora_trainer.estimate.memory import GIB, Settings, estimate
from qlora_trainer.estimate.shape_lookup import shape_for_model
from qlora_trainer.loading.model import load_base_model, load_tokenizer
from qlora_trainer.training.trainer_setup import build_trainer

PAIRS = REPO / "recipes" / "data" / "complaints-pref-train.jsonl"


@pytest.fixture(scope="module")
def llama8b():
    return shape_for_model("llama-3.1-8b")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_pair_costs_two_rows_and_the_reference_adds_only_its_forward(llama8b, checkpointing):
    base = Settings(rank=16, seq_len=2048, batch_size=2, gradient_checkpointing=checkpointing)
    sft, sft_pairs = estimate(llama8b, base), estimate(llama8b, dataclasses.replace(base, batch_size=4))
    dpo = estimate(llama8b, dataclasses.replace(base, method="dpo"))
    kto = estimate(llama8b, dataclasses.replace(base, method="kto"))
    assert dpo.breakdown["activations"] == sft_pairs.breakdown["activations"], "2 rows per pair, with gradients"
    assert kto.breakdown["activations"] == sft.breakdown["activations"], "KTO's rows run once with gradients"
    for est in (dpo, kto):
        assert est.breakdown["reference_forward"] >= 0
        assert est.breakdown["base_weights"] == sft.breakdown["base_weights"], "the reference loads no weights"
    without_reference = {k: v for k, v in dpo.breakdown.items() if k != "reference_forward"}
    assert sum(without_reference.values()) == sft_pairs.total
    assert "reference_forward" not in sft.breakdown
    if not checkpointing:  # every layer keeps all it saved: the reference's working set sits on top of it
        assert dpo.breakdown["reference_forward"] > 0 and kto.breakdown["reference_forward"] > 0
    assert any("train.method dpo" in note for note in dpo.notes), "said to be unmeasured on a GPU"


def test_orpo_pays_for_the_full_logits(llama8b):
    base = Settings(rank=16, seq_len=1024, batch_size=1)
    orpo = estimate(llama8b, dataclasses.replace(base, method="orpo"))
    dpo = estimate(llama8b, dataclasses.replace(base, method="dpo"))
    per_row = 1024 * llama8b.vocab * 2  # bf16 logits of one row
    # logits of both rows, the chosen row's copy and log-softmax, the logits' gradient of both rows
    assert orpo.breakdown["logits"] == per_row * (2 + 1 + 1 + 2)
    assert orpo.breakdown["activations"] == dpo.breakdown["activations"]
    assert "reference_forward" not in orpo.breakdown and orpo.total > dpo.total


def recipe(method, **train):
    return validate({"model": {"name_or_path": "llama-3.1-8b"}, "data": {"path": "x"}, "lora": {"r": 16},
                     "train": {"method": method, "seq_len": 2048, "gradient_accumulation_steps": 16, **train}}, "t")


def test_the_planner_fits_each_method_into_the_budget(llama8b):
    budget = auto_settings.Budget(24.0, "test")
    plans = {m: auto_settings.plan(recipe(m), llama8b, budget, on_gpu=True) for m in ("sft", "dpo", "orpo", "kto")}
    for method, chosen in plans.items():
        assert chosen.fits and chosen.predicted_gib <= fit_rule.usable_gib(24.0), method
        settled, _ = auto_settings.resolve(recipe(method), chosen)
        from qlora_trainer.estimate.recipe_settings import settings_from_recipe

        assert estimate(llama8b, settings_from_recipe(settled)).total / GIB == pytest.approx(chosen.predicted_gib)
    # Two rows per pair: DPO fits at most half of SFT's micro-batch in the same card, ORPO no more than DPO.
    assert plans["dpo"].micro_batch_size <= max(1, plans["sft"].micro_batch_size // 2)
    assert plans["orpo"].micro_batch_size <= plans["dpo"].micro_batch_size


def test_kto_is_never_planned_a_micro_batch_of_one(llama8b):
    tight = auto_settings.plan(recipe("kto"), llama8b, auto_settings.Budget(9.0, "test"), on_gpu=True)
    assert tight.micro_batch_size >= 2
    cpu = auto_settings.plan(recipe("kto"), llama8b, auto_settings.Budget(None, "cpu"), on_gpu=False)
    assert cpu.micro_batch_size == 2
    with pytest.raises(Exception, match="micro_batch_size must be 2 or more"):
        recipe("kto", micro_batch_size=1)


def test_estimate_of_the_dpo_recipe_names_its_reference_term():
    result = run_cli("estimate", "--recipe", "llama3-8b-dpo-r16", "--gpu-memory", "24", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["inputs"]["method"] == "dpo" and "reference_forward" in data["breakdown_gib"]
    assert data["fits"] and data["auto"]["predicted_gib"] == pytest.approx(data["total_gib"], abs=1e-3)


@pytest.mark.slow
def test_the_reference_forward_saves_nothing_for_backward(tiny_model_dir, tmp_path):
    """On CPU through TRL's own DPO loss: everything saved for backward in a step is what the policy's forward over
    the 2 x micro-batch rows saves alone, with the reference forward between."""
    path = tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, data={"path": str(PAIRS), "format": "auto", "max_rows": 8},
                       train={"method": "dpo", "micro_batch_size": 4, "gradient_checkpointing": False,
                              "activation_offloading": False, "packing": False, "padding_free": False,
                              "kernels": "none"})
    settled = load_recipe(str(path))[0]
    tokenizer = load_tokenizer(settled.model)
    data = fit_to_tokenizer(load_data(settled.data, 0, "dpo"), settled.data, tokenizer, 64, "tiny")
    (tmp_path / "run").mkdir()
    trainer = build_trainer(resolved_on_cpu(settled, data), load_base_model(settled.model, settled.quantization, "cpu"), tokenizer, data,
                            tmp_path / "run", "cpu")
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 8, "4 pairs run as 8 rows"
    model = trainer.model
    model.train()
    step = saved_bytes(model, lambda: trainer.compute_loss(model, batch), None)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    policy = saved_bytes(model, lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                              labels=labels, fused_lm_head=True, use_cache=False), None)
    assert step > 0 and abs(step - policy) <= 0.02 * policy, (step, policy)
    with torch.no_grad():
        assert saved_bytes(model, lambda: model(input_ids=batch["input_ids"], use_cache=False), None) == 0
