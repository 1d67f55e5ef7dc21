"""Shared fixtures: a private model cache and a tiny Llama built locally (no downloads anywhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_trainer.loading.demo_model import build_demo_model

TINY_SPEC = {
    "corpus": "data/complaints-train.jsonl",
    "vocab_size": 320,
    "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False),
}


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Keep demo models built by tests out of the user's ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["QLORA_TRAINER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-64 random Llama with a BPE tokenizer trained on the demo data, saved in bf16."""
    target = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_demo_model(TINY_SPEC, target)
    return target


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache that the hub libraries read offline: fill it with helpers.hub_cache_model."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML into the test's directory and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The README's demo run as shipped (about a minute on CPU), shared by the tests that need a trained adapter."""
    from helpers import run_cli

    run = tmp_path_factory.mktemp("demo") / "run"
    result = run_cli("--recipe", "tiny-demo", "--output-dir", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    (run / "stdout.txt").write_text(result.stdout)
    return run


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """An untrained LoRA adapter on the tiny model, saved as PEFT saves one (it names its base): enough for every
    way export and generate read an adapter, without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    target = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


def pytest_collection_modifyitems(items):
    """A test that needs the demo run waits for a whole training run: it belongs to the slow end-to-end set
    (`-m slow`), like the tests marked by hand."""
    for item in items:
        if "demo_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
