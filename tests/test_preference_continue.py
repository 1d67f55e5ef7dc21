"""model.adapter: a run continues an SFT run's adapter (or an adapter directory) with its LoRA settings; for DPO and
KTO the reference is that adapter, frozen (TRL's "ref" copy). A bad adapter is refused before anything is written."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, refused_cleanly, resolved_on_cpu, tiny_recipe
from safetensors.torch import load_file

from qlora_trainer.config.recipe_files import load_recipe
from qlora_trainer.dataset.data import load_data
from qlora_trainer.dataset.sequence_fit import fit_to_tokenizer
from qlora_trainer.loading import continued_adapter
from qlora_trainer.loading.model import load_base_model, load_config, load_tokenizer
from qlora_trainer.training.train import RunOptions, train
from qlora_trainer.training.trainer_setup import build_trainer

PAIRS = REPO / "recipes" / "data" / "complaints-pref-train.jsonl"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    """Four SFT steps at rank 4 on the tiny model: a finished run with an adapter to continue."""
    tmp = tmp_path_factory.mktemp("sft")
    recipe = load_recipe(str(tiny_recipe(tmp / "sft.yaml", tiny_model_dir, train={"max_steps": 4, "save_steps": 100, "learning_rate": 5e-3},
                                         lora={"r": 4, "alpha": 8})))[0]
    train(recipe, RunOptions(recipe_name="sft", output_dir=tmp / "run"))
    return tmp / "run"


def continue_recipe(tmp_path, model_dir, adapter, method="dpo", lora=None, **train_keys):
    path = tiny_recipe(tmp_path / "continue.yaml", model_dir, model={"adapter": str(adapter)},
                       data={"path": str(PAIRS), "format": "auto", "max_rows": 32},
                       train={"method": method, "max_steps": 2, "learning_rate": 5e-3, "gradient_checkpointing": True,
                              "activation_offloading": False, "packing": False, "padding_free": False,
                              "kernels": "none", **train_keys})
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["lora"] = lora or {}  # the helpers' rank 4 is the SFT run's; a continued adapter brings its own
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_continues_the_sft_adapter_against_a_frozen_copy_of_it(sft_run, tiny_model_dir, tmp_path, method):
    recipe = load_recipe(str(continue_recipe(tmp_path, tiny_model_dir, sft_run, method)))[0]
    recipe = continued_adapter.adopt(recipe, load_config(recipe.model))
    assert recipe.lora.r == 4 and recipe.lora.alpha == 8, "the adapter's own LoRA settings"
    tokenizer = load_tokenizer(recipe.model)
    data = fit_to_tokenizer(load_data(recipe.data, 0, method), recipe.data, tokenizer, 64, "tiny")
    (tmp_path / "run").mkdir()
    trainer = build_trainer(resolved_on_cpu(recipe, data), load_base_model(recipe.model, recipe.quantization, "cpu"), tokenizer, data,
                            tmp_path / "run", "cpu")
    sft = load_file(str(sft_run / "adapter" / "adapter_model.safetensors"))
    params = dict(trainer.model.named_parameters())
    default = {n: p for n, p in params.items() if ".default." in n}
    ref = {n: p for n, p in params.items() if ".ref." in n}
    assert set(trainer.peft_model.peft_config) == {"default", "ref"}
    assert ref and not any(p.requires_grad for p in ref.values()), "the reference copy is frozen"
    assert all(p.requires_grad for p in default.values())

    def saved(name):
        return sft[name.replace(".default.", ".").replace(".ref.", ".")].float()

    assert all(torch.equal(p.float(), saved(n)) for n, p in default.items()), "training starts from the SFT adapter"
    trainer.train()
    assert all(torch.equal(p.float(), saved(n)) for n, p in ref.items()), "the reference stays the SFT adapter"
    assert any(not torch.equal(p.float(), saved(n)) for n, p in default.items()), "the adapter trained on"
    trainer.save_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "ref").exists(), "only the trained adapter is saved"


def test_a_continued_run_starts_at_a_zero_margin(sft_run, tiny_model_dir, tmp_path):
    """Before training, the policy is the reference: every pair's reward margin is zero (up to the adapter's
    bf16 rounding), whatever the SFT adapter learned."""
    from qlora_trainer.training.preference_eval import combine, score

    recipe = load_recipe(str(continue_recipe(tmp_path, tiny_model_dir, sft_run)))[0]
    recipe = continued_adapter.adopt(recipe, load_config(recipe.model))
    tokenizer = load_tokenizer(recipe.model)
    data = fit_to_tokenizer(load_data(recipe.data, 0, "dpo"), recipe.data, tokenizer, 64, "tiny")
    (tmp_path / "run").mkdir()
    trainer = build_trainer(resolved_on_cpu(recipe, data), load_base_model(recipe.model, recipe.quantization, "cpu"), tokenizer, data,
                            tmp_path / "run", "cpu")
    result = combine([score(trainer.peft_model, tokenizer, data.train.to_list()[:16], 64, 0.1, batch_size=8)])
    assert result["pairs"] == 16 and abs(result["reward_margin"]) < 1e-2
    with trainer.peft_model.disable_adapter():  # against the bare base, the SFT adapter does move the log-probs
        base = combine([score(trainer.peft_model, tokenizer, data.train.to_list()[:16], 64, None, batch_size=8)])
    assert base["logp_margin"] != pytest.approx(result["logp_margin"], abs=0.05)


@pytest.mark.parametrize("case, fragment", [
    ("missing", "model.adapter: {tmp}/nowhere does not exist"),
    ("empty", "has no adapter_config.json, adapter_model.safetensors; pass a finished run"),
    ("unfinished", "(the run has not finished: no adapter/ yet)"),
    ("rank", "lora.r is 16 but model.adapter {sft}/adapter was trained with 4"),
    ("base", "does not match base"),
])
def test_a_bad_adapter_is_refused_before_anything_is_written(sft_run, tiny_model_dir, tmp_path, case, fragment):
    adapter = {"missing": tmp_path / "nowhere", "empty": tmp_path, "unfinished": tmp_path / "run0"}.get(case, sft_run)
    if case == "unfinished":
        adapter.mkdir()
        (adapter / "recipe.yaml").write_text("model: {name_or_path: x}\n")
    path = continue_recipe(tmp_path, tiny_model_dir, adapter, lora={"r": 16} if case == "rank" else None,
                           seq_len=64)
    if case == "base":  # the demo model is wider than the test's tiny model
        import yaml

        raw = yaml.safe_load(path.read_text())
        raw["model"]["name_or_path"] = "demo:tiny-llama"
        path.write_text(yaml.safe_dump(raw))
    refused_cleanly(["--recipe", str(path), "--output-dir", str(tmp_path / "out")], 2,
                    fragment.format(tmp=tmp_path, sft=sft_run), [tmp_path, sft_run])


def test_an_adapter_trained_on_other_weights_of_the_same_shapes_is_refused(sft_run, tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    path = continue_recipe(tmp_path, other, sft_run, seq_len=64)
    refused_cleanly(["--recipe", str(path), "--output-dir", str(tmp_path / "out")], 2,
                    "has other weights", [tmp_path / "out", sft_run])
    line = refused_cleanly(["--recipe", str(path), "--output-dir", str(tmp_path / "out")], 2, "model.adapter")
    assert "set model.name_or_path to the base it was trained on" in line
