"""What a base model must be for this trainer, checked before any weight loads: a readable config.json of an
architecture transformers knows, a decoder-only causal LM, LoRA targets that exist in it, enough positions for
train.seq_len, and (once the tokenizer is loaded) a vocabulary that covers the tokenizer.

Each check reads facts transformers states about the config, never the model's name: libraries accept most of
these mistakes and fail later with a traceback (PEFT, an IndexError mid-training) or train the wrong thing silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_trainer.errors import UserError
from qlora_trainer.loading.lora_targets import ALL_LINEAR, names_module


def check_config_file(path: Path, what: str, trust_remote_code: bool) -> None:
    """Name what is wrong with a local config.json (damaged, no model_type, an architecture transformers does not
    know): AutoConfig's own messages tell the user to pass a local directory with config.json, which they did."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        return  # a missing config is named by the caller, which knows what it expected
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what}: {config_file} is not UTF-8 text; the file is damaged: copy it again") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{what}: {config_file}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                        "the file is damaged or incomplete: copy it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise UserError(f"{what}: {config_file} has no model_type; it is not a transformers model config (save the "
                        "model with save_pretrained, which writes one)")
    model_type, remote = data["model_type"], "AutoConfig" in (data.get("auto_map") or {})
    if model_type in CONFIG_MAPPING or (remote and trust_remote_code):
        return
    hint = ("the repository ships its own code: set model.trust_remote_code: true if you trust it" if remote else
            "install a transformers version that supports it (pip install -U transformers)")
    raise UserError(f"{what}: model_type '{model_type}' in {config_file} is unknown to transformers "
                    f"{transformers.__version__}; {hint}")


def check_causal_lm(config, name: str) -> None:
    """A decoder-only causal LM: one transformers can build as a causal LM, not an encoder-decoder, and not an
    encoder. Encoder families (BERT and the like) have an `is_decoder` flag in their config and a causal-LM head
    that only warns when it is off; trained anyway, each token would see the tokens it is meant to predict."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text = config.get_text_config()
    kind = getattr(config, "model_type", type(config).__name__)
    fix = "fine-tune a decoder-only causal language model (Llama, Qwen, Mistral, Gemma, ...)"
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"'{name}' is an encoder-decoder model ({kind}); qlora-trainer trains decoder-only causal LMs: {fix}")
    if getattr(text, "is_decoder", None) is False:
        raise UserError(f"'{name}' is an encoder model ({kind}, is_decoder: false in its config), whose attention sees "
                        f"the whole sequence, not a causal LM: {fix}")
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise UserError(f"'{name}' ({kind}) has no causal-LM head in transformers: {fix}")


def linear_names(shape) -> list[str]:
    """The distinct last names of the model's linear layers: what lora.target_modules can list."""
    return sorted({layer.name.rsplit(".", 1)[-1] for layer in shape.linears})


def check_lora_targets(targets, shape, key: str = "lora.target_modules") -> None:
    """Every listed target must name a linear layer (PEFT matches a name or a dotted suffix); PEFT itself fails on
    none matching with a traceback and ignores a misspelt name among good ones."""
    if targets == ALL_LINEAR:
        return
    names = ", ".join(linear_names(shape))
    if not targets:
        raise UserError(f"{key} is empty; list some of {shape.name}'s linear layers ({names}) or use all-linear")
    unknown = [t for t in targets if not any(names_module(t, l.name) for l in shape.linears)]
    if unknown:
        raise UserError(f"{key}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a linear layer of "
                        f"{shape.name}; its linear layers are {names} (or use all-linear)")


def check_seq_len(seq_len: int, shape, key: str = "train.seq_len") -> None:
    """Positions past max_position_embeddings have no position embedding (an index error) or rotary angles the
    model never saw."""
    if shape.max_positions is not None and seq_len > shape.max_positions:
        raise UserError(f"{key} {seq_len} exceeds the {shape.max_positions} positions of {shape.name} "
                        f"(max_position_embeddings); use at most {shape.max_positions}")


def check_vocabulary(tokenizer, shape) -> None:
    """Token ids at or past vocab_size index past the embedding table: an IndexError in the middle of training."""
    if len(tokenizer) > shape.vocab:
        raise UserError(f"the tokenizer of {shape.name} has {len(tokenizer)} tokens but its config.json vocab_size is "
                        f"{shape.vocab}: ids past {shape.vocab - 1} have no embedding; use the tokenizer the model was "
                        "saved with, or resize the embeddings and save the model again")
