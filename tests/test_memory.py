"""The estimator's terms, each checked against what the real libraries allocate on CPU."""

from __future__ import annotations

import dataclasses
import json

import bitsandbytes as bnb
import pytest
import torch
from helpers import TIMEOUT, run_cli
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from qlora_trainer.config.recipe import ModelSection, QuantizationSection
from qlora_trainer.estimate.memory import (
    Settings,
    base_weight_bytes,
    estimate,
    lora_targets,
    model_shape,
    optimizer_state_bytes,
    quant_constant_bytes,
    unquantized_param_bytes,
)
from qlora_trainer.loading.architectures import known_architectures, load_architecture
from qlora_trainer.loading.model import load_base_model

FAMILIES = ["llama-2-7b", "mistral-7b", "qwen2.5-0.5b", "gemma-2-2b", "phi-3-mini"]


def tiny_config(name: str):
    """A known architecture shrunk to 2 layers of width 64, keeping its family's structure (bias, tying, fusing)."""
    config = load_architecture(name)
    config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = 16
    if hasattr(config, "layer_types"):
        config.layer_types = config.layer_types[:2] if config.layer_types else None
    return config


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Tiny random models of two families saved to disk, to be loaded in 4-bit like a real run."""
    dirs = {}
    for name in ("llama-2-7b", "qwen2.5-0.5b"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.bfloat16)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


def storage_bytes(tensors) -> int:
    """Bytes of distinct storages, so tensors shared between weights count once, as in real memory."""
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_known_architectures_cover_the_issue_list():
    for name in ("llama-7b", "llama-65b", "llama-2-70b", "llama-3.1-8b", "mistral-7b", "qwen2.5-72b", "gemma-2-27b", "phi-3-medium"):
        assert name in known_architectures()


def test_published_parameter_counts():
    shape = model_shape(load_architecture("llama-2-7b"), "llama-2-7b")
    assert shape.total_params == 6_738_415_616
    assert estimate(shape, Settings(rank=8)).trainable_params == 19_988_480  # the QLoRA paper's LLaMA-7B r=8 count


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", ["llama-2-7b", "qwen2.5-0.5b"])
def test_4bit_weights_and_constants_match_bitsandbytes(tiny_dirs, family, double_quant):
    model = load_base_model(ModelSection(name_or_path=str(tiny_dirs[family])), QuantizationSection(double_quant=double_quant), "cpu")
    four_bit = [p for p in model.parameters() if p.dtype == torch.uint8]
    states = [p.quant_state for p in four_bit]
    constants = storage_bytes([t for q in states for t in (q.absmax, q.code, q.offset, q.state2.absmax if q.state2 else None)])
    biases = sum(m.bias.numel() * m.bias.element_size() for m in model.modules()
                 if isinstance(m, bnb.nn.Linear4bit) and m.bias is not None)
    shape = model_shape(tiny_config(family), family)
    assert base_weight_bytes(shape) == storage_bytes(four_bit)
    assert quant_constant_bytes(shape, double_quant, 2) == pytest.approx(constants + biases, rel=0.01)


@pytest.mark.parametrize("family", ["llama-2-7b", "qwen2.5-0.5b"])
def test_unquantized_bytes_match_the_loaded_dtypes(tiny_dirs, family):
    model = load_base_model(ModelSection(name_or_path=str(tiny_dirs[family])), QuantizationSection(), "cpu")
    linear_biases = {id(m.bias) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.bias is not None}
    real = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != torch.uint8 and id(p) not in linear_biases)
    assert unquantized_param_bytes(model_shape(tiny_config(family), family), 2) == real


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank, targets", [(8, "all-linear"), (4, ["q_proj", "v_proj"]), (16, ["down_proj", "o_proj"])])
def test_trainable_parameters_equal_peft(family, rank, targets):
    config = tiny_config(family)
    if family == "phi-3-mini" and isinstance(targets, list):
        targets = ["qkv_proj", "o_proj"]  # Phi-3 fuses q, k and v
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert estimate(model_shape(config, family), Settings(rank=rank, target_modules=targets)).trainable_params == trainable


@pytest.mark.parametrize("optimizer, cls", [
    ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit), ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
    ("adamw_torch", torch.optim.AdamW),
])
def test_optimizer_state_matches_a_real_step(optimizer, cls):
    # Sizes on both sides of the 4096-element threshold under which bitsandbytes keeps 32-bit state.
    params = [torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16)) for n in (8 * 64, 8 * 512, 640 * 8, 8 * 3000)]
    opt = cls(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    held = [v for state in opt.state.values() for k, v in state.items()
            if torch.is_tensor(v) and k not in ("qmap1", "qmap2", "step", "unorm_vec")]
    predicted, _ = optimizer_state_bytes([p.numel() for p in params], optimizer, 2)
    assert predicted == storage_bytes(held)


def test_lora_targets_follow_peft_all_linear():
    shape = model_shape(tiny_config("llama-2-7b"), "tiny")
    assert len(lora_targets(shape, "all-linear")) == 2 * 7
    assert all(not t.name.endswith("lm_head") for t in lora_targets(shape, "all-linear"))


def test_estimate_grows_with_rank_sequence_and_batch():
    shape = model_shape(load_architecture("llama-3.1-8b"), "llama-3.1-8b")
    base = Settings()
    total = lambda **change: estimate(shape, dataclasses.replace(base, **change)).total
    assert total(rank=8) < total(rank=16) < total(rank=64)
    assert total(seq_len=512) < total(seq_len=1024) < total(seq_len=2048)
    assert total(batch_size=1) < total(batch_size=2) < total(batch_size=4)
    with_ckpt = estimate(shape, base).breakdown["activations"]
    without = estimate(shape, dataclasses.replace(base, gradient_checkpointing=False)).breakdown["activations"]
    assert with_ckpt < without / 4
    assert estimate(shape, dataclasses.replace(base, attn_implementation="eager")).total > estimate(shape, base).total


def test_per_gpu_terms_for_ddp_and_fsdp():
    shape = model_shape(load_architecture("llama-2-70b"), "llama-2-70b")
    one = estimate(shape, Settings(seq_len=1024)).breakdown
    ddp = estimate(shape, Settings(seq_len=1024, strategy="ddp", num_gpus=4)).breakdown
    assert ddp["ddp_grad_buckets"] == one["lora_params"], "a flat copy of every adapter gradient (same bytes as the adapters)"
    assert {k: v for k, v in ddp.items() if k not in ("ddp_grad_buckets", "allocator_overhead")} == \
        {k: v for k, v in one.items() if k != "allocator_overhead"}, "DDP replicates every single-GPU term"
    fsdp = estimate(shape, Settings(seq_len=1024, strategy="fsdp", num_gpus=2)).breakdown
    assert fsdp["base_weights"] == pytest.approx(one["base_weights"] / 2, abs=1)
    assert fsdp["optimizer_states"] == pytest.approx(one["optimizer_states"] / 2, abs=1)
    assert fsdp["lora_params"] == pytest.approx(one["lora_params"] * 2 / 2, abs=1), "fp32 under FSDP, halved"
    assert fsdp["quant_constants"] == one["quant_constants"], "quant_state is not a parameter FSDP shards"
    assert fsdp["activations"] == one["activations"]
    # Gathered: the root unit (embeddings, lm_head, norms) whole plus two decoder layers.
    two_layers = 2 * (one["base_weights"] + one["lora_params"]) / shape.layers
    assert fsdp["fsdp_gathered"] == pytest.approx(one["unquantized_params"] + two_layers, abs=1)
    offload = estimate(shape, Settings(seq_len=1024, strategy="fsdp", num_gpus=2, cpu_offload=True))
    assert offload.breakdown["base_weights"] == offload.breakdown["optimizer_states"] == 0
    assert offload.cpu_offload_bytes == sum(fsdp[k] for k in ("base_weights", "unquantized_params", "lora_params",
                                                                "lora_grads", "optimizer_states"))
    assert offload.total < estimate(shape, Settings(seq_len=1024, strategy="fsdp", num_gpus=2)).total < \
        estimate(shape, Settings(seq_len=1024)).total


@pytest.mark.slow
def test_estimate_command_takes_the_launch():
    fsdp = json.loads(run_cli("estimate", "--recipe", "llama2-70b-fsdp-2x24gb", "--json").stdout)
    assert fsdp["strategy"] == "fsdp" and fsdp["gpus"] == 2 and fsdp["cpu_offload_gib"] > 10
    assert fsdp["total_gib"] < 23.6, "the two-card recipe is predicted to fit a 24 GB card"
    ddp = json.loads(run_cli("estimate", "--model", "llama-3.1-8b", "--gpus", "4", "--json").stdout)
    assert ddp["strategy"] == "ddp" and "ddp_grad_buckets" in ddp["breakdown_gib"]
    bad = run_cli("estimate", "--model", "llama-3.1-8b", "--gpus", "2", "--strategy", "ddp", "--cpu-offload")
    assert bad.returncode == 2 and "--cpu-offload is an FSDP option" in bad.stderr


def test_estimate_json_has_the_contract_keys():
    result = run_cli("estimate", "--model", "llama-2-7b", "--rank", "8", "--seq-len", "2048", "--gpu-memory", "12", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data["breakdown_gib"]) == {"base_weights", "quant_constants", "unquantized_params", "lora_params",
                                          "lora_grads", "optimizer_states", "activations", "logits", "cuda_context",
                                          "allocator_overhead"}
    assert data["total_gib"] == pytest.approx(sum(data["breakdown_gib"].values()), abs=0.01)
    assert data["trainable_params"] == 19_988_480 and data["total_params"] == 6_738_415_616
    assert data["inputs"]["rank"] == 8 and data["inputs"]["optimizer"] == "paged_adamw_8bit"
    # Headroom is what is left of the budget less the safety margin (fit_rule): the same rule as the planner's.
    assert data["fits"] is True and data["headroom_gib"] == pytest.approx(12 * 0.95 - data["total_gib"], abs=0.01)
    assert data["all_params"] == data["total_params"] + data["trainable_params"]


def test_estimate_table_and_fit_from_a_recipe():
    result = run_cli("estimate", "--recipe", "llama7b-r8", "--gpu-memory", "8", "--fit")
    assert result.returncode == 0, result.stderr
    assert "base_weights" in result.stdout and "Largest that fits 8 GiB: seq_len" in result.stdout
    table = run_cli("estimate", "--table")
    assert "1024" in table.stdout and "llama-2-70b" in table.stdout


def test_estimate_reads_a_local_config(tmp_path):
    tiny_config("qwen2.5-0.5b").save_pretrained(tmp_path)
    result = run_cli("estimate", "--model", str(tmp_path / "config.json"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total_params"] == model_shape(tiny_config("qwen2.5-0.5b"), "x").total_params


def test_estimate_bad_input_is_one_line():
    result = run_cli("estimate", "--model-size", "6B")
    assert result.returncode == 2 and "known sizes are" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_measure_vram_tool_runs_the_training_path_on_cpu(tmp_path):
    """tools/measure_vram.py is the GPU proof; on CPU its code path still has to work end to end, also with two
    configurations at once in one work directory (as --jobs runs them): each process has its own run directory."""
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "out.jsonl"
    shrink = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1})
    jobs = [subprocess.Popen([sys.executable, str(REPO / "tools" / "measure_vram.py"), "--device", "cpu", "--arch",
                              "llama-3.1-8b", "--seq-len", str(seq), "--batch-size", "2", "--steps", "2", "--config-override",
                              shrink, "--workdir", str(tmp_path / "work"), "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seq in (64, 48)]
    for job in jobs:
        _, stderr = job.communicate(timeout=TIMEOUT)
        assert job.returncode == 0, stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["seq_len"] for r in rows) == [48, 64]
    for row in rows:
        assert row["steps"] == 2 and row["predicted_gib"] > 0 and row["final_loss"] > 0
        assert set(row["predicted_breakdown_gib"]) >= {"base_weights", "activations", "logits"}
    assert not list((tmp_path / "work").glob("run-*")), "each job removes its own run directory"


def test_vram_grid_covers_the_issue():
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("measure_vram", REPO / "tools" / "measure_vram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs = module.grid_configs()
    assert len(configs) >= 12
    for key, values in module.GRID.items():
        assert {c[key] for c in configs} >= set(values), key
    assert {"gemma-2-2b"} <= {c["arch"] for c in configs if c["attn"] == "eager"}, "Gemma-2 needs eager attention"
    assert any(c["offload"] for c in configs) and any(c["kernels"] == "liger" for c in configs)
    assert any(c["packing"] for c in configs)


def test_a_run_that_would_not_fit_stops_with_the_changes_that_fit():
    from qlora_trainer.errors import WontFitError
    from qlora_trainer.estimate.fit_search import check_fits

    shape = model_shape(load_architecture("llama-3.1-8b"), "llama-3.1-8b")
    settings = Settings(rank=64, seq_len=4096, batch_size=4, gradient_checkpointing=False)
    predicted = estimate(shape, settings)
    with pytest.raises(WontFitError) as info:
        check_fits(predicted, shape, 24.0, "free memory on the GPU", force=False)
    message = str(info.value)
    assert info.value.exit_code == 3 and "exceeds 22.8 GiB, 95% of the 24.0 GiB budget (free memory on the GPU)" in message
    assert "--set train.gradient_checkpointing=true" in message and "--force" in message
    check_fits(predicted, shape, 24.0, "free memory on the GPU", force=True)  # --force lets it run
