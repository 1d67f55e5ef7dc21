"""Export: merge a trained adapter into its base and write fp16/bf16 safetensors that plain transformers loads.

By default each 4-bit-trained weight is first rounded through NF4 exactly as training saw it (same quant type,
block size and double quantization), then the LoRA delta is added. The adapter learned to correct *that*
weight, not the original 16-bit one, so merging into the original weights gives a different model
(`--base-weights original` does it anyway and reports the drift). The merge streams the base checkpoint one
tensor at a time into output shards, so memory holds about two shards, not the model (measured in
benchmarks/export/rss.json by tools/measure_export_rss.py).
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_trainer.deploy.adapter_source import AdapterSource, find_adapter, load_adapter_tokenizer
from qlora_trainer.deploy.export_verify import (
    DEFAULT_PROMPTS,
    MAX_RELATIVE_LOGIT_ERROR,
    MIN_TOP1_AGREEMENT,
    compare_logits,
    verification_prompts,
)
from qlora_trainer.errors import UserError
from qlora_trainer.files.damaged_files import check_safetensors, read_json_object
from qlora_trainer.files.made_dirs import make_dirs, remove_empty
from qlora_trainer.files.model_card import adapter_name, shown_name
from qlora_trainer.files.run_dir import apply_umask
from qlora_trainer.files.staging import clear_abandoned, held, make_staging_dir, rename_no_replace
from qlora_trainer.loading import base_fingerprint
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.adapter_shapes import check_adapter_matches, lora_module
from qlora_trainer.loading.model import DTYPES
from qlora_trainer.loading.weight_files import base_safetensors


@dataclass
class ExportOptions:
    source: Path
    output: Path
    dtype: str | None = None  # default: the run's export.dtype, else float16
    base_weights: str = "dequantized"  # or "original"
    base: str | None = None
    max_shard_size: str = "2GB"  # the streaming merge holds about two shards in memory
    verify: bool = True
    force: bool = False


def export(options: ExportOptions) -> dict:
    """Merge, write to a temporary directory, verify, then move into place. Returns the verification report."""
    if (options.output.exists() or options.output.is_symlink()) and not options.force:
        raise UserError(f"--output {options.output} already exists; choose another directory or add --force to replace it")
    _check_output_apart(options)
    _shard_bytes(options.max_shard_size)  # a bad size is bad input, found before any work
    source = find_adapter(options.source, options.base)
    if options.dtype is None:
        options.dtype = source.recipe.export.dtype if source.recipe else "float16"
    config = model_lib.load_config(source.base)
    check_adapter_matches(source.adapter_dir, config, source.base.name_or_path)
    base_fingerprint.check(source.adapter_dir, source.base, "adapter", base_fingerprint.DAMAGED_FIX_WITH_BASE)
    print(f"Merging {source.adapter_dir} into {source.base.name_or_path} "
          f"({'NF4-dequantized' if options.base_weights == 'dequantized' else 'original 16-bit'} base weights) -> {options.dtype}")

    for note in clear_abandoned(options.output):
        print(note)
    staging, made = _staging_dir(options.output)
    try:
        with held(staging):  # a later export removes the staging directory only once no writer holds it
            if not merge_streaming(source, options, config, staging):
                write_export(merge(source, options), source, staging, options)
            report = verify(staging, source, options) if options.verify else {"verified": False}
            _write_model_card(staging, source, options, report)
            apply_umask(staging)
            _move_into_place(staging, options.output, options.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left looking like an export
        remove_empty(made)  # nor the parent directories made for it (unless another export wrote into them)
        raise
    return report


def _staging_dir(output: Path) -> tuple[Path, list[Path]]:
    """A temporary directory beside the output (the final rename then stays on one disk), making the output's
    missing parents as `mkdir -p` would; with the parents it made, for removing them again if the export fails."""
    made: list[Path] = []
    try:
        made = make_dirs(output.parent)
        return make_staging_dir(output), made
    except OSError as err:
        remove_empty(made)
        reason = "a part of it is a file" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror
        raise UserError(f"--output {output}: cannot write in {output.parent} ({reason}); choose a writable "
                        "directory") from None


def _check_output_apart(options: ExportOptions) -> None:
    """The export must neither replace nor land inside the run or adapter it reads: `--output RUN/adapter --force`
    would swap the trained adapter for the merged model while summary.json still calls the run complete."""
    source, output = options.source.resolve(), options.output.resolve()
    if options.output.exists() and not options.output.is_dir():
        raise UserError(f"--output {options.output} is a file, not a directory; choose a directory path for the export")
    in_run = source.name == "adapter" and (source.parent / "recipe.yaml").is_file()
    run = source.parent if in_run else source  # RUN/adapter: the whole run is the source
    if output == run or output.is_relative_to(run) or run.is_relative_to(output):
        raise UserError(f"--output {options.output} would replace or land inside the run or adapter it exports "
                        f"({run}); choose a directory outside it")


def merge_streaming(source: AdapterSource, options: ExportOptions, config, target: Path) -> bool:
    """Read the base checkpoint one tensor at a time, merge, and write output shards as they fill: memory holds
    one shard, not the model. Returns False (having written nothing) when the checkpoint's tensor names are not
    the model's own, which transformers renames on load; `merge` handles those in memory."""
    from safetensors import safe_open

    files = base_safetensors(source.base, download=True, fix="pass a local copy with --base")
    check_safetensors(files, f"the weights of base '{source.base.name_or_path}': copy or download them again, or "
                             "pass another copy with --base")
    names = model_lib.meta_model(config)
    expected, quantized = set(names.state_dict()), model_lib.quantized_linear_names(names)
    keys = []
    for path in files:
        with safe_open(str(path), "pt") as handle:
            keys += list(handle.keys())
    if not keys or any(k not in expected for k in keys):
        print("The base checkpoint's tensor names differ from the model's; merging in memory instead.")
        return False
    adapter = _load_adapter(source.adapter_dir)
    missing = sorted(m for m in adapter.layers if f"{m}.weight" not in keys)
    if missing:
        raise UserError(f"the base checkpoint has no weight for adapted layer {missing[0]}; pass the base it was trained on with --base")
    writer = ShardWriter(target, _shard_bytes(options.max_shard_size))
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key).to(DTYPES[source.quantization.compute_dtype])  # as training loaded it
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module in quantized and options.base_weights == "dequantized":
                    tensor = nf4_round_trip(tensor, source.quantization)
                if key.endswith(".weight") and module in adapter.layers:
                    tensor = adapter.merge_into(module, tensor)
                writer.add(key, tensor.to(DTYPES[options.dtype]))
    writer.close()
    _write_configs(config, source, target, options)
    return True


class ShardWriter:
    """Collect tensors into safetensors shards of at most `max_bytes`, named and indexed as transformers expects."""

    def __init__(self, target: Path, max_bytes: int):
        self.target, self.max_bytes = target, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.target / f".shard-{len(self.written) + 1}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        total = len(self.written)
        if total == 1:
            self.written[0][0].rename(self.target / "model.safetensors")
            return
        weight_map, size = {}, 0
        for number, (path, keys) in enumerate(self.written, start=1):
            name = f"model-{number:05d}-of-{total:05d}.safetensors"
            path.rename(self.target / name)
            size += (self.target / name).stat().st_size
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": size}, "weight_map": weight_map}
        (self.target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _shard_bytes(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise UserError(f"--max-shard-size {text}: expected a size such as 2GB or 500MB") from None


def _write_configs(config, source: AdapterSource, target: Path, options: ExportOptions) -> None:
    from transformers import GenerationConfig

    config = config.__class__.from_dict(config.to_dict())
    config.dtype = options.dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(target)
    try:
        generation = GenerationConfig.from_pretrained(model_lib.resolve_model_path(source.base), revision=source.base.revision)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(target)
    load_adapter_tokenizer(source).save_pretrained(target)


def merge(source: AdapterSource, options: ExportOptions):
    """Load the base in the compute dtype on CPU and fold each LoRA delta into its weight, one layer at a time."""
    from transformers import AutoModelForCausalLM

    compute = DTYPES[source.quantization.compute_dtype]
    base = AutoModelForCausalLM.from_pretrained(
        model_lib.resolve_model_path(source.base), revision=source.base.revision, dtype=compute,
        trust_remote_code=source.base.trust_remote_code, device_map={"": "cpu"},
        use_safetensors=not source.base.allow_pickle_weights)
    adapter = _load_adapter(source.adapter_dir)
    quantized = model_lib.quantized_linear_names(base)
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.data
        if name in quantized and options.base_weights == "dequantized":
            weight = nf4_round_trip(weight, source.quantization)
        if name in adapter.layers:
            weight = adapter.merge_into(name, weight)
        module.weight.data = weight.to(DTYPES[options.dtype])
    base.to(DTYPES[options.dtype])
    return base


def nf4_round_trip(weight: torch.Tensor, quant) -> torch.Tensor:
    """The weight exactly as the 4-bit model used it: quantize with bitsandbytes, then dequantize."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=quant.double_quant,
                                       quant_type=quant.quant_type)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


@dataclass
class _Adapter:
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # name -> (A, B, DoRA magnitude)
    scale: float

    def merge_into(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W + scale * B @ A in fp32; with DoRA, rescale each output row to the learned magnitude (PEFT's formula)."""
        lora_a, lora_b, magnitude = self.layers[name]
        merged = weight.float() + self.scale * (lora_b.float() @ lora_a.float())
        if magnitude is not None:
            merged = merged * (magnitude.float() / merged.norm(p=2, dim=1)).unsqueeze(1)
        return merged


def _load_adapter(adapter_dir: Path) -> _Adapter:
    from safetensors.torch import load_file

    config = read_json_object(adapter_dir / "adapter_config.json", "train or copy the adapter again")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir}: only LoRA adapters can be merged (this one is {config.get('peft_type')})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"{adapter_dir}: per-layer rank or alpha patterns are not supported by export yet")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (r, alpha)):
        raise UserError(f"{adapter_dir / 'adapter_config.json'} is damaged (r and lora_alpha must be positive numbers); "
                        "train or copy the adapter again")
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    layers = {}
    for key in tensors:
        module = lora_module(key, "lora_A")
        if module is not None:
            prefix = key.split(".lora_A.")[0]
            magnitude = tensors.get(f"{prefix}.lora_magnitude_vector")
            if magnitude is None:
                magnitude = tensors.get(f"{prefix}.lora_magnitude_vector.weight")
            layers[module] = (tensors[key], tensors[f"{prefix}.lora_B.weight"], magnitude)
    return _Adapter(layers, scale)


def write_export(model, source: AdapterSource, target: Path, options: ExportOptions) -> None:
    model.config.dtype = options.dtype
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True, max_shard_size=options.max_shard_size)
    load_adapter_tokenizer(source).save_pretrained(target)


def verify(target: Path, source: AdapterSource, options: ExportOptions) -> dict:
    """Load the export with plain transformers and compare its logits with the trained model: the 4-bit base
    (dequantized in fp32) plus the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = verification_prompts(source) or DEFAULT_PROMPTS
    device = model_lib.default_device()
    reference = exact_reference(PeftModel.from_pretrained(
        model_lib.load_base_model(source.base, source.quantization, device), source.adapter_dir))
    exported = AutoModelForCausalLM.from_pretrained(target, dtype=DTYPES[options.dtype], device_map={"": device})
    report = compare_logits(reference, exported, tokenizer, prompts)
    report["method"] = options.base_weights
    within = report["top1_agreement"] >= MIN_TOP1_AGREEMENT and report["relative_logit_error"] <= MAX_RELATIVE_LOGIT_ERROR
    report["verified"] = within
    print(f"Verification ({len(prompts)} prompts, {report['tokens']} tokens): top-1 agreement "
          f"{report['top1_agreement']:.2%}, relative logit error {report['relative_logit_error']:.4f}")
    if not within and options.base_weights == "dequantized":
        raise UserError(f"export verification failed: top-1 agreement {report['top1_agreement']:.2%} (need "
                        f"{MIN_TOP1_AGREEMENT:.0%}), relative logit error {report['relative_logit_error']:.4f} (max "
                        f"{MAX_RELATIVE_LOGIT_ERROR}); nothing was written to {options.output}; check --base is the model the "
                        "adapter was trained on (--no-verify skips this check)")
    if not within:
        print("The merge into the original weights drifts from the trained model, as expected; "
              "the default --base-weights dequantized reproduces it.")
    return report


def exact_reference(model):
    """The trained model's function without bf16 arithmetic: the 4-bit weights still dequantize to exactly the
    bf16 values training used, but every matmul, activation and the adapter run in fp32. Memory stays that of the
    4-bit model plus fp32 copies of the small unquantized parameters."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
            # bitsandbytes' CPU inference kernel repacks the weights and computes in bf16; keep the plain
            # dequantize-then-matmul path that training used.
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def _write_model_card(target: Path, source: AdapterSource, options: ExportOptions, report: dict) -> None:
    recipe = source.recipe
    lines = [f"# Merged QLoRA fine-tune of {shown_name(source.base.name_or_path)}", "",
             "Exported by qlora-trainer: plain transformers weights, no PEFT or bitsandbytes needed.", "",
             f"- base model: `{shown_name(source.base.name_or_path)}`",
             f"- adapter: `{adapter_name(source.adapter_dir)}`",
             f"- export: {options.dtype}, merged into the "
             f"{'NF4-dequantized base weights the adapter was trained against' if options.base_weights == 'dequantized' else 'original 16-bit base weights'}"]
    if recipe is not None:
        lines += [f"- LoRA: r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, dropout={recipe.lora.dropout:g}, targets {recipe.lora.target_modules}",
                  f"- quantization during training: {recipe.quantization.quant_type}, double quant {recipe.quantization.double_quant}, compute {recipe.quantization.compute_dtype}",
                  f"- dataset: `{shown_name(recipe.data.path)}`"]
    if report.get("tokens"):
        lines.append(f"- verification: top-1 agreement {report['top1_agreement']:.2%}, relative logit error "
                     f"{report['relative_logit_error']:.4f} against the 4-bit base + adapter on {report['tokens']} tokens")
    (target / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (target / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, output: Path, force: bool) -> None:
    """Rename the finished export into place. Without --force an output that appeared since the export began
    (another export to it finished first) is refused, not replaced. With --force the old one is moved aside first
    and put back if the rename fails, so a failure never leaves neither; once the new one is in place the old one
    is deleted."""
    if not force:
        try:
            rename_no_replace(staging, output)
        except FileExistsError:
            raise UserError(f"--output {output} appeared while this export ran (another export to it finished "
                            "first?) and is left as it is; this export was not kept: choose another --output, or "
                            "add --force to replace it") from None
        return
    if not (output.exists() or output.is_symlink()):
        staging.rename(output)
        return
    old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        old.rename(output)
        raise
    try:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    except OSError as err:  # the export is done; what is left is the previous one, and the user must know where
        print(f"WARNING: the previous {output} was moved to {old} but could not be deleted ({err.strerror}); delete it")
