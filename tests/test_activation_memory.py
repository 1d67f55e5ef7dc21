"""The activation terms against what autograd really saves: tiny 4-bit models through the trainer's own loading and
PEFT wrapping, every tensor saved for backward counted (distinct storages, parameters excluded) with
torch.autograd.graph.saved_tensors_hooks. One difference from CUDA is accounted for by name: on CPU, dropout saves
a compute-dtype noise tensor (at::dropout's unfused path) where CUDA's fused kernel saves a bool mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from qlora_trainer.config.recipe import LoraSection, ModelSection, QuantizationSection
from qlora_trainer.estimate.activation_memory import (
    DROPOUT_MASK_BYTES,
    activation_peak,
    attention_matrix_bytes,
    layer_saved_bytes_per_token,
    lora_saved_bytes_per_token,
)
from qlora_trainer.estimate.memory import Settings, estimate, lora_targets, model_shape
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.architectures import load_architecture

SEQ = 48


def small_config(name: str):
    """Width 128 and 3 layers: big enough that per-token tensors dominate, with the family's structure kept."""
    config = load_architecture(name)
    gqa = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    config.update(dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2 if gqa else 4, head_dim=32, vocab_size=256, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:3]
    return config


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    dirs = {}
    for name in ("llama-7b", "qwen2.5-7b", "gemma-2-2b"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small_config(name), dtype=torch.bfloat16)
        dirs[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(dirs[name])
    return dirs


def peft_model(path, lora: LoraSection, attn: str):
    base = model_lib.load_base_model(ModelSection(name_or_path=str(path), attn_implementation=attn), QuantizationSection(), "cpu")
    model = get_peft_model(base, model_lib.lora_config(lora))
    model_lib.set_adapter_dtype(model, lora)
    model.train()
    return model


def saved_bytes(model, run, layer_index: int | None) -> int:
    """Bytes of distinct non-parameter storages saved for backward: during one decoder layer, or the whole forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer = model.base_model.model.model.layers[layer_index] if layer_index is not None else None
    seen, recording = {}, [layer is None]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if recording[0] and ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    handles = []
    if layer is not None:
        def start(module, args, kwargs):
            recording[0] = True
            # The layer's inputs (hidden state, RoPE tables) are the previous layer's or the model's, not its own.
            for value in [*args, *kwargs.values(), *(kwargs.get("position_embeddings") or ())]:
                if torch.is_tensor(value):
                    params.add(value.untyped_storage().data_ptr())

        handles = [layer.register_forward_pre_hook(start, with_kwargs=True),
                   layer.register_forward_hook(lambda *a: recording.__setitem__(0, False))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    for h in handles:
        h.remove()
    return sum(seen.values())


def forward(model):
    ids = torch.randint(3, 256, (1, SEQ))
    return lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def cpu_expected(name: str, settings: Settings) -> float:
    """The estimator's per-layer figure, with CPU dropout's noise tensor (compute dtype) in place of CUDA's mask."""
    shape = model_shape(small_config(name), name)
    targets = lora_targets(shape, settings.target_modules)
    expected = layer_saved_bytes_per_token(shape, targets, settings) * SEQ + attention_matrix_bytes(shape, settings)
    if settings.lora_dropout > 0:
        expected += (2 - DROPOUT_MASK_BYTES) * sum(t.in_features for t in targets) / shape.layers * SEQ
    return expected


@pytest.mark.parametrize("name, attn", [("llama-7b", "sdpa"), ("qwen2.5-7b", "sdpa"), ("gemma-2-2b", "eager")])
@pytest.mark.parametrize("rank, dropout", [(8, 0.0), (8, 0.05), (64, 0.05)])
def test_one_layer_saves_what_the_estimate_counts(small_dirs, name, attn, rank, dropout):
    model = peft_model(small_dirs[name], LoraSection(r=rank, alpha=2 * rank, dropout=dropout), attn)
    real = saved_bytes(model, forward(model), layer_index=1)  # a middle layer: its input requires grad
    settings = Settings(rank=rank, lora_dropout=dropout, seq_len=SEQ, attn_implementation=attn)
    assert real == pytest.approx(cpu_expected(name, settings), rel=0.01)


def test_dropout_copies_cost_what_the_estimate_says(small_dirs):
    """Dropout gives every target its own copy of its input (and a mask): the suspect of the rank-64 error."""
    without = peft_model(small_dirs["llama-7b"], LoraSection(dropout=0.0), "sdpa")
    with_dropout = peft_model(small_dirs["llama-7b"], LoraSection(dropout=0.05), "sdpa")
    real = saved_bytes(with_dropout, forward(with_dropout), 1) - saved_bytes(without, forward(without), 1)
    predicted = cpu_expected("llama-7b", Settings(seq_len=SEQ)) - cpu_expected("llama-7b", Settings(seq_len=SEQ, lora_dropout=0.0))
    assert real > 0 and real == pytest.approx(predicted, rel=0.01)


def test_checkpointing_keeps_only_each_layers_input(small_dirs):
    model = peft_model(small_dirs["llama-7b"], LoraSection(), "sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    shape = model_shape(small_config("llama-7b"), "llama-7b")
    real = saved_bytes(model, forward(model), layer_index=None)
    inputs = shape.layers * 2 * shape.hidden * SEQ
    final_norm = 4 * shape.hidden * SEQ + 4 * SEQ  # fp32 copy and rsqrt, outside any checkpoint
    assert real == pytest.approx(inputs + final_norm, rel=0.02)


# ---------------------------------------------------------------- lever terms, full size


@pytest.fixture(scope="module")
def llama7b():
    return model_shape(load_architecture("llama-7b"), "llama-7b")


def test_offloading_removes_the_checkpointed_layer_inputs(llama7b):
    base = Settings(batch_size=4)
    on = dataclasses.replace(base, activation_offloading=True)
    targets = lora_targets(llama7b, "all-linear")
    kept = 2 * llama7b.hidden * 4 * 2048
    saved = activation_peak(llama7b, targets, base).activations - activation_peak(llama7b, targets, on).activations
    assert saved == (llama7b.layers - 1) * kept, "all but the top layer's input go to CPU"
    assert activation_peak(llama7b, targets, on).offloaded == saved
    # Measured on an H100 (shared/calibration/speed-levers): 9.75 -> 7.50 GiB as nvidia-smi shows it.
    drop = (estimate(llama7b, base).total - estimate(llama7b, on).total) / 2**30
    assert 1.8 < drop < 2.3


def test_liger_saves_less_in_norms_and_mlp(llama7b):
    targets = lora_targets(llama7b, "all-linear")
    plain = layer_saved_bytes_per_token(llama7b, targets, Settings())
    liger = layer_saved_bytes_per_token(llama7b, targets, Settings(kernels="liger"))
    # RMSNorm keeps its bf16 input instead of an fp32 copy (2 norms x 2h), SwiGLU recomputes silu(gate) (2i).
    assert plain - liger == 2 * 2 * llama7b.hidden + 2 * llama7b.intermediate
    drop = (estimate(llama7b, Settings(batch_size=4)).total - estimate(llama7b, Settings(batch_size=4, kernels="liger")).total)
    assert 0.2 < drop / 2**30 < 0.6  # measured 9.75 -> 9.26 GiB


def test_padding_free_attention_covers_all_the_micro_batchs_tokens(llama7b):
    rows = Settings(batch_size=4, attn_implementation="eager")
    flat = dataclasses.replace(rows, padding_free=True)
    assert attention_matrix_bytes(llama7b, flat) == 4 * attention_matrix_bytes(llama7b, rows), "(B*S)^2 vs B*S^2"
    sdpa = Settings(batch_size=4)
    assert estimate(llama7b, dataclasses.replace(sdpa, packing=True)).total > estimate(llama7b, sdpa).total  # the mask


def test_dropout_zero_shares_the_normed_input(llama7b):
    targets = lora_targets(llama7b, "all-linear")
    shared = lora_saved_bytes_per_token(llama7b, targets, Settings(lora_dropout=0.0, rank=1))
    # One normed input per block (attention, MLP), the gated product for down_proj, the rank-1 intermediates.
    assert shared == 2 * (2 * llama7b.hidden + llama7b.intermediate) + 2 * 7
