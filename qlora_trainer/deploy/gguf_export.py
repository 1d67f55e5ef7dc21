"""GGUF export for llama.cpp and Ollama: the same NF4-round-trip merge as the safetensors export, converted by
llama.cpp's own converter, read back and verified, with an Ollama Modelfile, then moved into place.

`--format gguf-adapter` converts the adapter alone, for Ollama's ADAPTER line over a base GGUF.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from qlora_trainer.deploy import export as safetensors_export
from qlora_trainer.deploy import llama_cpp_converter, modelfile
from qlora_trainer.deploy.adapter_source import AdapterSource, find_adapter, load_adapter_tokenizer
from qlora_trainer.errors import UserError
from qlora_trainer.files.made_dirs import remove_empty
from qlora_trainer.files.model_card import adapter_name, shown_name
from qlora_trainer.files.run_dir import apply_umask
from qlora_trainer.files.staging import clear_abandoned, held
from qlora_trainer.loading import base_fingerprint
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.adapter_shapes import check_adapter_matches

BASE_GGUF = "base.gguf"  # where an adapter's Modelfile expects the base model's GGUF
# The merged weights handed to the converter. q8_0 starts from the compute dtype, which the NF4 weights dequantize
# to exactly, so the only rounding is q8_0's own.
_MERGE_DTYPE = {"f16": "float16", "bf16": "bfloat16"}


@dataclass
class GgufOptions:
    source: Path
    output: Path
    quant: str = "f16"
    adapter_only: bool = False
    base: str | None = None
    force: bool = False


def export_gguf(options: GgufOptions) -> dict:
    """Convert, verify, write the Modelfile, then move into place. Returns the verification report."""
    _check_libraries()
    if options.output.exists() and not options.force:
        raise UserError(f"--output {options.output} already exists; choose another directory or add --force to replace it")
    safetensors_export._check_output_apart(safetensors_export.ExportOptions(options.source, options.output))
    source = find_adapter(options.source, options.base)
    config = model_lib.load_config(source.base)
    check_adapter_matches(source.adapter_dir, config, source.base.name_or_path)
    base_fingerprint.check(source.adapter_dir, source.base, "adapter", base_fingerprint.DAMAGED_FIX_WITH_BASE)
    check_family(config)
    for note in clear_abandoned(options.output):
        print(note)
    staging, made = safetensors_export._staging_dir(options.output)
    try:
        with held(staging):
            write = _write_adapter if options.adapter_only else _write_model
            report = write(source, config, options, staging)
            apply_umask(staging)
            safetensors_export._move_into_place(staging, options.output, options.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left looking like an export
        remove_empty(made)  # nor the parents made for it (unless another export wrote into them)
        raise
    return report


def _check_libraries() -> None:
    import importlib.util

    missing = [name for name in ("gguf", "sentencepiece") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format gguf needs {' and '.join(missing)}: pip install 'qlora-trainer[gguf]'")


def check_family(config) -> None:
    """Refuse, before any merging, a model whose architecture llama.cpp's converter has no logic for."""
    architecture = (config.architectures or [f"{config.model_type} (no architectures in config.json)"])[0]
    if architecture not in llama_cpp_converter.supported_architectures():
        raise UserError(f"--format gguf: llama.cpp's converter (llama-cpp-python "
                        f"{llama_cpp_converter.LLAMA_CPP_PYTHON_VERSION}) cannot convert {architecture}; export "
                        "safetensors instead (leave out --format)")


def _write_model(source: AdapterSource, config, options: GgufOptions, staging: Path) -> dict:
    from transformers import AutoConfig

    merged = staging / ".merged"
    merged.mkdir()
    merge_options = safetensors_export.ExportOptions(
        source=options.source, output=options.output, base=options.base,
        dtype=_MERGE_DTYPE.get(options.quant, source.quantization.compute_dtype))
    print(f"Merging {source.adapter_dir} into {source.base.name_or_path} (NF4-dequantized base weights) -> GGUF "
          f"{options.quant}")
    if not safetensors_export.merge_streaming(source, merge_options, config, merged):
        safetensors_export.write_export(safetensors_export.merge(source, merge_options), source, merged, merge_options)
    _carry_sentencepiece_model(source, merged)
    gguf_name = f"model-{options.quant}.gguf"
    tokenizer = load_adapter_tokenizer(source)
    llama_cpp_converter.convert_model(merged, staging / gguf_name, options.quant,
                                      llama_cpp_converter.space_after_special_tokens(tokenizer))
    merged_config = AutoConfig.from_pretrained(merged)
    eos_ids = _generation_eos_ids(merged)
    shutil.rmtree(merged)  # the read-back must find only the GGUF
    from qlora_trainer.deploy.gguf_verify import verify_gguf

    report = verify_gguf(staging, gguf_name, merged_config, source, tokenizer, options.output)
    report.update(format="gguf", quant=options.quant, file=gguf_name)
    _write_modelfile(staging, gguf_name, tokenizer, eos_ids, source)
    _write_card(staging, source, report)
    return report


def _carry_sentencepiece_model(source: AdapterSource, merged: Path) -> None:
    """The converter reads a SentencePiece vocabulary from `tokenizer.model`, which transformers 5 re-saves for
    some tokenizer classes and not others (Gemma's): take it from the adapter, else from the base."""
    if (merged / "tokenizer.model").is_file():
        return
    found = _sentencepiece_model(source)
    if found is not None:
        shutil.copyfile(found, merged / "tokenizer.model")


def _sentencepiece_model(source: AdapterSource) -> Path | None:
    if (source.adapter_dir / "tokenizer.model").is_file():
        return source.adapter_dir / "tokenizer.model"
    base = Path(model_lib.resolve_model_path(source.base))
    if base.is_dir():
        return base / "tokenizer.model" if (base / "tokenizer.model").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(base), "tokenizer.model", revision=source.base.revision)
    return Path(cached) if isinstance(cached, str) else None  # training fetched the base's tokenizer


def _generation_eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    return [ids] if isinstance(ids, int) else list(ids or [])


def _write_modelfile(staging: Path, gguf_name: str, tokenizer, eos_ids: list[int], source: AdapterSource) -> None:
    wrappers = modelfile.chat_wrappers(tokenizer)
    if wrappers is None:
        print("note: the chat template is not a per-role wrapper an Ollama TEMPLATE can express; the Modelfile has "
              "no TEMPLATE and Ollama uses the template stored in the GGUF")
    for note in wrappers.notes if wrappers else []:
        print(f"note: {note}")
    header = f"Ollama Modelfile made by qlora-trainer for a fine-tune of {shown_name(source.base.name_or_path)}.\n" \
             f"ollama create NAME -f Modelfile   (run in this directory)"
    text = modelfile.modelfile(gguf_name, wrappers, modelfile.stop_tokens(tokenizer, wrappers, eos_ids), header)
    (staging / "Modelfile").write_text(text, encoding="utf-8")


def _write_card(staging: Path, source: AdapterSource, report: dict) -> None:
    lines = [f"# GGUF of a QLoRA fine-tune of {shown_name(source.base.name_or_path)}", "",
             "Exported by qlora-trainer with llama.cpp's converter (llama-cpp-python "
             f"{llama_cpp_converter.LLAMA_CPP_PYTHON_VERSION}). Run it with llama.cpp, or `ollama create NAME -f "
             "Modelfile` in this directory.", "",
             f"- base model: `{shown_name(source.base.name_or_path)}`", f"- adapter: `{adapter_name(source.adapter_dir)}`",
             f"- file: `{report['file']}` ({report['quant']})"]
    if report.get("tokens"):
        lines.append(f"- verification (read back with transformers): tokenization identical on "
                     f"{report['tokenization_checked']} texts, top-1 agreement {report['top1_agreement']:.2%}, "
                     f"relative logit error {report['relative_logit_error']:.4f} against the 4-bit base + adapter "
                     f"on {report['tokens']} tokens")
    (staging / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (staging / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _write_adapter(source: AdapterSource, config, options: GgufOptions, staging: Path) -> dict:
    from qlora_trainer.deploy.gguf_adapter import write_adapter_gguf

    report = write_adapter_gguf(source.adapter_dir, config, staging, options.quant)
    tokenizer = load_adapter_tokenizer(source)
    wrappers = modelfile.chat_wrappers(tokenizer)
    header = (f"Ollama Modelfile made by qlora-trainer for a LoRA adapter of {source.base.name_or_path}.\n"
              f"FROM must be a GGUF of that base's original weights, saved here as {BASE_GGUF}\n"
              "(llama.cpp's convert_hf_to_gguf.py makes one); then: ollama create NAME -f Modelfile")
    stops = modelfile.stop_tokens(tokenizer, wrappers, [])
    text = modelfile.modelfile(BASE_GGUF, wrappers, stops, header, adapter=report["file"])
    (staging / "Modelfile").write_text(text, encoding="utf-8")
    (staging / "export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
