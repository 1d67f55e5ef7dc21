"""Inference: load a trained adapter (or a merged export), format prompts the way training did, stream tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_trainer.dataset import formats
from qlora_trainer.deploy.adapter_source import AdapterSource, find_adapter, is_merged_model, load_adapter_tokenizer
from qlora_trainer.errors import UserError, first_line
from qlora_trainer.files.damaged_files import check_safetensors, safetensors_of
from qlora_trainer.loading import base_fingerprint
from qlora_trainer.loading import model as model_lib
from qlora_trainer.loading.adapter_shapes import check_adapter_matches


@dataclass
class GenerateOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stream: bool = True


def load_for_inference(path: Path, base: str | None = None):
    """(model, tokenizer, source) from a run directory, an adapter directory or a merged export (source None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = model_lib.default_device()
    if is_merged_model(path):
        check_safetensors(safetensors_of(path), "export it again")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, device_map={"": device}, use_safetensors=True)
            return model, AutoTokenizer.from_pretrained(path), None
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: cannot load the merged model ({first_line(err)}); export it again") from None
    from peft import PeftModel

    source = find_adapter(path, base)
    check_adapter_matches(source.adapter_dir, model_lib.load_config(source.base), source.base.name_or_path)
    base_fingerprint.check(source.adapter_dir, source.base, "adapter", base_fingerprint.DAMAGED_FIX_WITH_BASE)
    base_model = model_lib.load_base_model(source.base, source.quantization, device)
    model = PeftModel.from_pretrained(base_model, source.adapter_dir)
    return model, load_adapter_tokenizer(source), source


def format_prompt(prompt: str | list[dict], source: AdapterSource | None, tokenizer) -> str:
    """The text the model saw before its answers in training (dataset/formats.py): the chat template for
    conversational rows, the Alpaca prompt for alpaca rows, or the prompt as given. Chat turns (a JSONL
    --file's conversations) always go through the chat template."""
    if isinstance(prompt, list):
        if not tokenizer.chat_template:
            raise UserError("--file holds chat turns, but the model's tokenizer has no chat template to render them "
                            "with; give text prompts instead")
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    if source is None:
        return prompt
    return formats.inference_prompt(prompt, tokenizer, source.data_format, source.data_conversational)


@torch.no_grad()
def generate(model, tokenizer, text: str, options: GenerateOptions) -> str:
    from transformers import TextStreamer

    model.eval()
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p} if options.temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if options.stream else None
    output = model.generate(**inputs, max_new_tokens=options.max_new_tokens, streamer=streamer,
                            pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
