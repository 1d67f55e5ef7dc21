"""The demo base model: a tiny, randomly initialised Llama with a tokenizer trained on the demo data.

It is built on first use (a few seconds, no download) and cached under `$QLORA_TRAINER_CACHE`
(default `~/.cache/qlora_trainer`) in `demo-models/<name>/`. It is a demo model: it knows no language,
so everything the demo shows was learned by the LoRA adapters.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from qlora_trainer.config.recipe import DEMO_MODEL_PREFIX
from qlora_trainer.config.recipe_files import shipped_recipes_dir
from qlora_trainer.errors import UserError
from qlora_trainer.files.cache import cache_dir
from qlora_trainer.files.run_dir import apply_umask

# Bump the version when the architecture or tokenizer changes, so stale caches are not reused.
DEMO_MODELS = {
    "tiny-llama": {
        "version": 1,
        "corpus": "data/complaints-train.jsonl",
        "vocab_size": 512,
        "config": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False),
    },
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def is_demo_model(name_or_path: str) -> bool:
    return name_or_path.startswith(DEMO_MODEL_PREFIX)


def demo_model_path(name_or_path: str) -> Path:
    """Return the local directory of a `demo:NAME` model, building it on first use."""
    name = name_or_path.removeprefix(DEMO_MODEL_PREFIX)
    if name not in DEMO_MODELS:
        raise UserError(f"model.name_or_path: unknown demo model '{name}'; demo models are {', '.join('demo:' + n for n in DEMO_MODELS)}")
    spec = DEMO_MODELS[name]
    target = cache_dir() / "demo-models" / f"{name}-v{spec['version']}"
    if not (target / "config.json").is_file():
        print(f"Building the demo model {name_or_path} in {target} (first use only) ...", file=sys.stderr, flush=True)
        build_demo_model(spec, target)
    return target


def build_demo_model(spec: dict, target: Path) -> None:
    """Write tokenizer and random-weight model to a temporary directory, then rename it into place."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _train_tokenizer(shipped_recipes_dir() / spec["corpus"], spec["vocab_size"])
    # Any family transformers knows (spec["model_type"]; Llama by default): tests build one of each this way.
    config = AutoConfig.for_model(spec.get("model_type", "llama"), vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **spec["config"])
    torch.manual_seed(0)  # the same demo model on every machine
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "DEMO_MODEL.txt").write_text(
            "A randomly initialised demo model built by qlora-trainer. It knows no language.\n", encoding="utf-8"
        )
        apply_umask(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have built it at the same time
            raise


def _train_tokenizer(corpus: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(row["prompt"] + row["completion"])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHATML_TEMPLATE)
