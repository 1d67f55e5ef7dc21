"""Base model in 4-bit NF4, its tokenizer, the LoRA configuration, and the trainable-parameter report."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from qlora_trainer.config.recipe import AUTO, LoraSection, ModelSection, QuantizationSection
from qlora_trainer.distributed import Launch
from qlora_trainer.errors import UserError, first_line
from qlora_trainer.files.damaged_files import damaged_safetensors, safetensors_of
from qlora_trainer.loading.model_checks import check_config_file
from qlora_trainer.loading.model_path import resolve_model_path
from qlora_trainer.loading.weight_files import has_weight_files

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(section: ModelSection):
    """The model's transformers config, read without loading any weights."""
    from transformers import AutoConfig

    path = resolve_model_path(section)
    if Path(path).is_dir():
        check_config_file(Path(path), "model.name_or_path", section.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, revision=section.revision, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot read the config of '{section.name_or_path}' ({first_line(err)}); "
                        "check the hub id and network, or pass a local copy with --set model.name_or_path=/path") from None


def quantization_config(section: QuantizationSection, sharded: bool = False):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=DTYPES[section.compute_dtype],
        # FSDP shards flat parameters of one dtype: the packed 4-bit bytes are stored in a tensor of the compute
        # dtype, so they flatten together with the 16-bit norms and adapters (the same bytes, viewed as bf16).
        bnb_4bit_quant_storage=DTYPES[section.compute_dtype] if sharded else torch.uint8,
    )


def load_base_model(model: ModelSection, quant: QuantizationSection, device: str, launch: Launch = Launch()):
    """Load the base model with every linear layer in 4-bit.

    `dtype=compute_dtype` keeps embeddings, lm_head and norms in 16-bit. We deliberately do not call
    `peft.prepare_model_for_kbit_training`: it casts every non-4-bit parameter to fp32, about 1 GB more on a
    7B model with a 32k vocabulary (2 GB on Llama-3-8B), and TRL's SFTTrainer trains fine without it.
    Each DDP process loads a whole copy onto its own GPU (start() made it the current device). Under FSDP no
    device map is given: FSDP moves each process's shard to its GPU when it wraps the model.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    sharded = launch.strategy == "fsdp"
    device_map = None if sharded else {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    try:
        base = AutoModelForCausalLM.from_pretrained(
            path,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            quantization_config=quantization_config(quant, sharded),
            dtype=DTYPES[quant.compute_dtype],
            # `auto` passes nothing: transformers picks per model, as the plan predicted (attention.py).
            attn_implementation=None if model.attn_implementation == AUTO else model.attn_implementation,
            device_map=device_map,
            use_safetensors=not model.allow_pickle_weights,  # unpickling can run code: safetensors unless allowed
        )
    except SafetensorError as err:
        found = damaged_safetensors(safetensors_of(Path(path)))
        culprit = f"{found[0]} is damaged ({found[1]})" if found else \
            f"a weights file of '{model.name_or_path}' is damaged ({first_line(err)})"
        raise UserError(f"model.name_or_path: {culprit}; copy or download the model again") from None
    except OSError as err:
        if Path(path).is_dir() and not has_weight_files(Path(path)):
            raise UserError(f"model.name_or_path: {path} has no weight files (*.safetensors or *.bin); the model "
                            "was saved without its weights or the copy is incomplete: copy the weights too") from None
        if "safetensors" in str(err) and not model.allow_pickle_weights:
            raise UserError(f"model.name_or_path: '{model.name_or_path}' has no safetensors weights; convert them, or set "
                            "model.allow_pickle_weights: true if you trust the files (unpickling can run code)") from None
        raise UserError(f"model.name_or_path: cannot load '{model.name_or_path}' ({first_line(err)}); "
                        "check the hub id and network, or pass a local copy with --set model.name_or_path=/path") from None
    keep_4bit_layout(base)
    return base


def keep_4bit_layout(model) -> None:
    """Keep every 4-bit layer in the layout that backpropagates. On CPUs with AVX512-BF16, bitsandbytes repacks a
    layer's weights for a faster kernel the first time it runs in eval mode without gradients (our held-out
    generation before training does), and keeps them so: that kernel has no backward, so training afterwards
    would silently drop the gradient through every base layer (torch warns "an autograd kernel was not
    registered"). The repacking is bitsandbytes' per-layer switch `support_avx512bf16_for_cpu`."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(model: ModelSection):
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot load the tokenizer of '{model.name_or_path}' ({first_line(err)})") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS as padding is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(section: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        use_rslora=section.use_rslora,
        use_dora=section.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def set_adapter_dtype(model, section: LoraSection) -> None:
    """Put the trainable adapter weights in the recipe's dtype.

    TRL already casts them to bf16 for a 4-bit base; this also honours `lora.dtype: float32`. The DoRA magnitude
    stays fp32, as TRL keeps it: its updates can be smaller than bf16 resolves.
    """
    dtype = DTYPES[section.dtype]
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name and param.dtype != dtype:
            param.data = param.data.to(dtype)


def parameter_report(model) -> dict:
    """Trainable and total parameters as PEFT counts them (a 4-bit weight counts as its unpacked size)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": round(100 * trainable / total, 4)}


def format_parameter_report(report: dict) -> str:
    return (f"trainable params: {report['trainable_params']:,} || all params: {report['total_params']:,} "
            f"|| trainable%: {report['trainable_percent']:.4f}")


def meta_model(config):
    """The model built on PyTorch's meta device: every module and shape, no memory allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def quantized_linear_names(model) -> set[str]:
    """Names of the linear layers transformers quantizes to 4-bit: all but lm_head, tied and fp32-pinned modules.
    Uses transformers' own rule so that the estimator and the export agree with what loading really does."""
    from transformers.quantizers.base import get_keys_to_not_convert

    keep = set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not any(name == k or name.endswith("." + k) or name.startswith(k + ".") for k in keep)}


def adapter_checksum(model) -> str:
    """SHA-256 of the trainable weights (names and bytes): equal in every DDP process when they trained in step."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_dtypes(model) -> dict[str, str]:
    """Dtype of each frozen, non-4-bit parameter (embeddings, lm_head, norms), for the run summary and tests."""
    return {name: str(param.dtype).removeprefix("torch.") for name, param in model.named_parameters()
            if not param.requires_grad and param.dtype != torch.uint8}
