"""Every family people fine-tune today, each as a tiny random model: it trains through the CLI, exports with
verification, runs with the attention implementation transformers picks for it, and the estimator's static terms
match the loaded 4-bit model to the byte. The published architecture files reproduce the published sizes."""

from __future__ import annotations

import dataclasses
import json

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model
from safetensors import safe_open

from qlora_trainer import cli
from qlora_trainer.config.recipe import LoraSection, ModelSection, QuantizationSection
from qlora_trainer.estimate.memory import (
    Settings,
    base_weight_bytes,
    estimate,
    model_shape,
    quant_constant_bytes,
    unquantized_param_bytes,
)
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.architectures import _raw, architecture_for, load_architecture
from qlora_trainer.loading.demo_model import build_demo_model

# One architecture file per family; the tiny model keeps its structure (tying, biases, norms, fused projections).
FAMILIES = {
    "llama": "llama-3.2-1b", "mistral": "mistral-7b", "qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b",
    "gemma2": "gemma-2-2b", "gemma3_text": "gemma-3-1b", "phi3": "phi-4-mini",
}
# The families whose published models share the embedding matrix with the output layer (Mistral's do not).
TIED = {"llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256, initializer_range=0.1)
# The demo builder sets these from the tokenizer.
TOKEN_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def tiny_spec(arch: str) -> dict:
    values = {k: v for k, v in _raw(arch).items() if not k.startswith("_") and k not in TOKEN_KEYS}
    model_type = values.pop("model_type")
    return {"corpus": "data/complaints-train.jsonl", "vocab_size": 320, "model_type": model_type,
            "config": {**values, **TINY}}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family, arch in FAMILIES.items():
        dirs[family] = root / family
        build_demo_model(tiny_spec(arch), dirs[family])
    return dirs


# ---------------------------------------------------------------- the published architectures


# (name, parameters counted on the meta device, the size its model card publishes in billions: total and, where
# the card gives it, non-embedding). The count is exact; the published size is that count rounded as the card does.
PUBLISHED = [
    ("llama-3.2-1b", 1_235_814_400, 1.23, None),
    ("llama-3.2-3b", 3_212_749_824, 3.21, None),
    ("qwen3-0.6b", 596_049_920, 0.6, 0.44),
    ("qwen3-1.7b", 1_720_574_976, 1.7, 1.4),
    ("qwen3-4b", 4_022_468_096, 4.0, 3.6),
    ("qwen3-8b", 8_190_735_360, 8.2, 6.95),
    ("qwen3-14b", 14_768_307_200, 14.8, 13.2),
    ("qwen3-32b", 32_762_123_264, 32.8, 31.2),
    ("gemma-2-2b", 2_614_341_888, 2.61, None),
    ("gemma-2-9b", 9_241_705_984, 9.24, None),
    ("gemma-2-27b", 27_227_128_320, 27.2, None),
    ("gemma-3-1b", 999_885_952, 1.0, None),
    ("mistral-nemo-12b", 12_247_782_400, 12.2, None),
    ("phi-4-mini", 3_836_021_760, 3.84, None),
]


def _as_published(count: int, published: float) -> bool:
    """Cards round (Qwen3-8B: 8.19 -> 8.2) or cut (Llama-3.2-1B: 1.236 -> 1.23) to the digits they show."""
    digits = len(repr(published).split(".")[1]) if published != int(published) else 0
    return abs(count / 1e9 - published) < 10**-digits


@pytest.mark.parametrize("name, total, published, non_embedding", PUBLISHED)
def test_architecture_files_give_the_published_sizes(name, total, published, non_embedding):
    shape = model_shape(load_architecture(name), name)
    assert shape.total_params == total
    assert _as_published(total, published)
    if non_embedding is not None:  # the embedding matrix, and an untied lm_head of the same shape
        embedding = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
        assert _as_published(total - embedding, non_embedding)
    for hub_id in _raw(name)["_hub_ids"]:
        assert architecture_for(hub_id) == name


def test_attention_auto_is_what_transformers_picks_per_model():
    assert model_shape(load_architecture("gemma-2-9b"), "g").default_attention == "eager"  # soft-capping needs it
    assert "sdpa" not in model_shape(load_architecture("gemma-2-9b"), "g").supported_attention
    for name in ("qwen3-8b", "llama-3.2-3b", "gemma-3-1b", "phi-4-mini", "mistral-nemo-12b"):
        assert model_shape(load_architecture(name), name).default_attention == "sdpa", name


# ---------------------------------------------------------------- each family: static terms to the byte


@pytest.mark.parametrize("family", FAMILIES)
def test_static_terms_match_the_loaded_4bit_model(family_dirs, family):
    from transformers import AutoConfig

    model = model_lib.load_base_model(ModelSection(name_or_path=str(family_dirs[family])), QuantizationSection(), "cpu")
    shape = model_shape(AutoConfig.from_pretrained(family_dirs[family]), family)
    four_bit = [p for p in model.parameters() if p.dtype == torch.uint8]
    assert base_weight_bytes(shape) == sum(p.numel() for p in four_bit)
    linear_biases = {id(m.bias) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.bias is not None}
    sixteen_bit = [p for p in model.parameters() if p.dtype != torch.uint8 and id(p) not in linear_biases]
    assert unquantized_param_bytes(shape, 2) == sum(p.numel() * p.element_size() for p in sixteen_bit)
    constants = sum(t.numel() * t.element_size() for p in four_bit for t in _quant_state_tensors(p.quant_state))
    biases = sum(model.get_parameter(n).numel() * 2 for n, p in model.named_parameters() if id(p) in linear_biases)
    assert quant_constant_bytes(shape, True, 2) == constants + biases
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == shape.tied_embeddings == (family in TIED)
    peft_model = get_peft_model(model, model_lib.lora_config(LoraSection(r=8)))
    assert estimate(shape, Settings(rank=8)).trainable_params == peft_model.get_nb_trainable_parameters()[0]


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """Each weight's own constants: absmax, the code table, and with double quantization the nested absmax, its
    code table and the offset (counted per weight, as the estimator does)."""
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.offset]
    return tensors


# ---------------------------------------------------------------- each family: train, export, verify


def _train(model_dir, run, extra=()) -> int:
    return cli.main(["--recipe", "tiny-demo", "--output-dir", str(run),
                     "--set", f"model.name_or_path={model_dir}", "--set", "train.max_steps=2",
                     "--set", "train.micro_batch_size=2", "--set", "data.max_rows=8", "--set", "data.eval_path=null",
                     "--set", "eval.exact_match=false", "--set", "train.logging_steps=1", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_two_steps_and_exports_verified(family_dirs, family, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "merged"
    assert _train(family_dirs[family], run) == 0, capsys.readouterr().err[-2000:]
    plan = capsys.readouterr().out
    expected = model_shape(load_architecture(FAMILIES[family]), family).default_attention
    assert f"{expected} attention (auto: transformers' choice for the model)" in plan
    assert (run / "summary.json").is_file()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s][-1] == 2 and all(s["loss"] > 0 for s in steps if "loss" in s)
    assert (run / "recipe.yaml").read_text().count(f"attn_implementation: {expected}") == 1, "the run records it"
    assert json.loads((run / "estimate.json").read_text())["inputs"]["attn_implementation"] == expected
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        assert not [k for k in adapter.keys() if "embed" in k or "lm_head" in k], "tied or not, only LoRA weights"

    assert cli.main(["export", str(run), "--output", str(out)]) == 0, capsys.readouterr().err[-2000:]
    assert "Verification" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.model_type == model_shape(load_architecture(FAMILIES[family]), family).model_type
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == (family in TIED)


# ---------------------------------------------------------------- the attention implementation


def test_a_refused_attention_choice_is_one_line_naming_the_key(family_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(family_dirs["gemma2"], run, ["--set", "model.attn_implementation=sdpa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "model.attn_implementation: sdpa is not supported by Gemma2ForCausalLM" in err[0]
    assert "which supports eager, flash_attention_2" in err[0] and "model.attn_implementation: auto" in err[0]
    assert not run.exists()


def test_auto_attention_drives_the_estimate_and_packing():
    from qlora_trainer.config.recipe_files import load_recipe
    from qlora_trainer.estimate.auto_settings import Budget, plan, resolve
    from qlora_trainer.estimate.recipe_settings import settings_from_recipe

    recipe, _ = load_recipe("gemma2-9b-r16")
    assert recipe.model.attn_implementation == "auto"
    shape = model_shape(load_architecture("gemma-2-9b"), "gemma-2-9b")
    chosen = plan(recipe, shape, Budget(24.0, "test"), on_gpu=True)
    settled, _ = resolve(recipe, chosen)
    assert chosen.attn_implementation == settled.model.attn_implementation == "eager"
    assert "attn_implementation" in chosen.chosen and "eager attention" in chosen.describe()
    # Eager keeps the seq_len^2 scores: the estimate the plan used is the eager one, not the sdpa one.
    eager = estimate(shape, settings_from_recipe(settled))
    sdpa = estimate(shape, dataclasses.replace(eager.settings, attn_implementation="sdpa"))
    assert eager.breakdown["activations"] > sdpa.breakdown["activations"]
    assert chosen.predicted_gib == pytest.approx(eager.total / 2**30, rel=1e-9)
    # Short rows on a GPU would pack, but not with the eager attention `auto` resolved to.
    packed, notes = resolve(recipe, chosen, "prompt_completion", 100)
    assert packed.train.packing is False and "eager attention" in notes[0]


# ---------------------------------------------------------------- the recipes


@pytest.mark.parametrize("name, card_gib, attention", [
    ("qwen3-8b-r16", 12, "sdpa"), ("llama3.2-3b-r16", 8, "sdpa"), ("gemma2-9b-r16", 12, "eager"),
])
def test_family_recipes_fit_the_card_their_header_names(name, card_gib, attention, capsys):
    from qlora_trainer.config.recipe_files import find_recipe

    header = find_recipe(name).read_text().splitlines()[2]
    assert f" {card_gib} GB card" in header and f"--gpu-memory {card_gib}" in header
    assert cli.main(["estimate", "--recipe", name, "--gpu-memory", str(card_gib), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is True and result["auto"]["fits"] is True
    assert result["inputs"]["attn_implementation"] == attention == result["auto"]["attn_implementation"]
    assert cli.main(["recipes"]) == 0
    assert name in capsys.readouterr().out


def test_a_multimodal_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """Gemma-3 4B and up: AutoModelForCausalLM builds the whole image-text model from their config."""
    from transformers import Gemma3Config

    text = dict(TINY, vocab_size=320)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    Gemma3Config(text_config=text, vision_config=vision, architectures=["Gemma3ForConditionalGeneration"]).save_pretrained(tmp_path)
    assert cli.main(["estimate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a multimodal model (gemma3, Gemma3ForConditionalGeneration)" in err[0]
    assert err[0].startswith("qlora-trainer: error: model.name_or_path:") and "text-only checkpoint" in err[0]
