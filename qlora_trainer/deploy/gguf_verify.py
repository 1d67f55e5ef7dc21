"""Read a GGUF export back and compare it with the trained model: tokenizer first (BOS included), then logits.

transformers dequantizes a GGUF on load. Its GGUF-to-config mapping is incomplete for some families (it does not
read Qwen3's head_dim or Phi-3's partial rotary dimension), so the model is loaded as the GGUF's architecture (a
Mistral GGUF is a llama one) with the merged model's hyperparameters: what is checked is what the converter wrote,
the tensors (names, llama.cpp's Q/K layout, Gemma's norm offset, the quantization) and the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_trainer.deploy.export_verify import (
    DEFAULT_PROMPTS,
    MAX_RELATIVE_LOGIT_ERROR,
    MIN_TOP1_AGREEMENT,
    compare_logits,
    verification_prompts,
)
from qlora_trainer.errors import UserError, first_line

# f16/bf16 hold the merged weights as the safetensors export does, so its bars apply. q8_0 rounds each weight to
# 8 bits per 32-value block: on the tiny family models it stays under 0.02 relative error with full agreement.


def verify_gguf(directory: Path, gguf_name: str, config, source, tokenizer, output: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = verification_prompts(source) or DEFAULT_PROMPTS
    try:
        read_back = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_name)
        candidate = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_name, dtype=torch.float32,
                                                         config=_read_back_config(directory, gguf_name, config))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"GGUF export verification failed: transformers cannot read the converted file back "
                        f"({first_line(err)}); nothing was written to {output}") from None
    check_space_after_special(tokenizer, directory / gguf_name, output)
    checked = check_tokenization(tokenizer, read_back, prompts, output)
    report = compare_logits(_reference(source), candidate, tokenizer, prompts)
    report["tokenization_checked"] = checked
    report["verified"] = (report["top1_agreement"] >= MIN_TOP1_AGREEMENT
                          and report["relative_logit_error"] <= MAX_RELATIVE_LOGIT_ERROR)
    print(f"Verification of the GGUF read back ({len(prompts)} prompts, {report['tokens']} tokens): tokenization "
          f"identical on {checked} texts, top-1 agreement {report['top1_agreement']:.2%}, relative logit error "
          f"{report['relative_logit_error']:.4f}")
    if not report["verified"]:
        raise UserError(f"GGUF export verification failed: top-1 agreement {report['top1_agreement']:.2%} (need "
                        f"{MIN_TOP1_AGREEMENT:.0%}), relative logit error {report['relative_logit_error']:.4f} (max "
                        f"{MAX_RELATIVE_LOGIT_ERROR}) against the 4-bit model + adapter; nothing was written to "
                        f"{output}; try --quant f16, or check --base is the model the adapter was trained on")
    return report


def _read_back_config(directory: Path, gguf_name: str, merged_config):
    """The config transformers reads from the GGUF, with every hyperparameter the merged model's config also has
    taken from the merged model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_name).to_dict()
    merged = {k: v for k, v in merged_config.to_dict().items() if k in config and k not in ("model_type", "architectures")}
    values = {k: v for k, v in {**config, **merged}.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **values)


def check_tokenization(tokenizer, read_back, prompts: list[str], output: Path) -> int:
    """The GGUF's tokenizer must give the ids training gave, with the same BOS: the prompts as they are and as the
    chat template renders them. Returns how many texts were compared."""
    texts = list(prompts)
    if tokenizer.chat_template:
        texts += [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True) for p in prompts]
    for text in texts:
        expected, got = tokenizer(text)["input_ids"], read_back(text)["input_ids"]
        if expected != got:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            raise UserError(f"GGUF export verification failed: the GGUF's tokenizer splits {text[:40]!r} differently "
                            f"from training's (token {at}: {_token(tokenizer, expected, at)} in training, "
                            f"{_token(read_back, got, at)} in the GGUF); nothing was written to {output}; llama.cpp "
                            "would read prompts differently from the trained model")
    return len(texts)


def check_space_after_special(tokenizer, gguf_path: Path, output: Path) -> None:
    """transformers' GGUF tokenizer follows the training tokenizer here, llama.cpp follows the GGUF's
    `add_space_prefix` (on unless written off) for a SentencePiece vocabulary: check that flag directly."""
    from gguf import GGUFReader

    from qlora_trainer.deploy.llama_cpp_converter import space_after_special_tokens

    fields = GGUFReader(gguf_path).fields
    if fields["tokenizer.ggml.model"].contents() != "llama":  # llama.cpp's SentencePiece vocabulary type
        return
    flag = fields.get("tokenizer.ggml.add_space_prefix")
    in_gguf, in_training = (flag.contents() if flag else True), space_after_special_tokens(tokenizer)
    if in_gguf != in_training:
        raise UserError(f"GGUF export verification failed: llama.cpp would {'' if in_gguf else 'not '}put a space "
                        f"before the text that follows each special token, which the training tokenizer does "
                        f"{'not ' if in_gguf else ''}do (add_space_prefix {in_gguf} in the GGUF); nothing was "
                        f"written to {output}; llama.cpp would read every chat turn differently from the trained "
                        "model")


def _token(tokenizer, ids: list[int], at: int) -> str:
    return repr(tokenizer.convert_ids_to_tokens(ids[at])) if at < len(ids) else "the end"


def _reference(source):
    """The trained model as export.verify builds it: the 4-bit base plus the adapter, in fp32 arithmetic."""
    from peft import PeftModel

    from qlora_trainer.deploy.export import exact_reference
    from qlora_trainer.loading import model as model_lib

    device = model_lib.default_device()
    return exact_reference(PeftModel.from_pretrained(
        model_lib.load_base_model(source.base, source.quantization, device), source.adapter_dir))
