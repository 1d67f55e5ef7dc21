"""GGUF export through llama.cpp's own converter, read back and verified, for a tiny model of each family.

Each tiny model takes the tokenizer path its published models take. The families whose converter reads a
SentencePiece `tokenizer.model` get one trained here on the demo corpus. llama.cpp's converter recognises a
byte-level BPE tokenizer only by the hash of its output on a fixed text, so the Qwen families get the published
Qwen vocabulary (151,643 byte-level BPE ranks), which the `dashscope` package ships as `qwen.tiktoken`: the
converter recognises it as `qwen2`, as it does Qwen1.5 to Qwen3. A tiny BPE vocabulary trained here shows the
one-line error users get for a tokenizer it does not know. The converter is fetched from PyPI on first use
(llama_cpp_converter).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import refused_cleanly
from safetensors import safe_open
from test_model_families import FAMILIES, tiny_spec
from test_modelfile import render_go_template, template_of

from qlora_trainer import cli
from qlora_trainer.config.recipe_files import shipped_recipes_dir
from qlora_trainer.loading.demo_model import CHATML_TEMPLATE, build_demo_model

pytestmark = pytest.mark.slow
SENTENCEPIECE_FAMILIES = ["llama", "mistral", "gemma2", "gemma3_text", "phi3"]
BPE_ONLY_FAMILIES = ["qwen2", "qwen3"]  # their converter reads tokenizer.json's byte-level BPE only
# Qwen's pre-tokenizer split (its tokenizer.json's Split pattern; tiktoken's cl100k one with single digits).
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_sentencepiece_model(family: str, target) -> None:
    """A tiny random model of `family` with a SentencePiece tokenizer (byte fallback, ChatML turn markers)."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer

    corpus = shipped_recipes_dir() / "data" / "complaints-train.jsonl"
    texts = [row["prompt"] + row["completion"] for row in map(json.loads, corpus.read_text().splitlines())]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    target.mkdir(parents=True)
    (target / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer_class = GemmaTokenizer if family.startswith("gemma") else LlamaTokenizer
    tokenizer = tokenizer_class.from_pretrained(target, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>", add_bos_token=True,
                                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if family == "phi3":  # Phi-3's published tokenizer.json prefixes a space by normalizer, to every text piece
        from tokenizers import normalizers

        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.backend_tokenizer.pre_tokenizer = None
    save_tiny_model(family, tokenizer, target)


def save_tiny_model(family: str, tokenizer, target) -> None:
    """The tokenizer with the ChatML template, and a random tiny `family` model sized to it, saved in `target`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(target)
    spec = tiny_spec(FAMILIES[family])
    if "query_pre_attn_scalar" in spec["config"]:
        # llama.cpp scales Gemma's queries by the head size (the hidden size per head for 27B), which equals
        # query_pre_attn_scalar in every published Gemma-2/3; the tiny model keeps them equal as well.
        spec["config"]["query_pre_attn_scalar"] = spec["config"]["head_dim"]
    config = AutoConfig.for_model(spec["model_type"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **spec["config"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(target)


def qwen_vocabulary():
    """The published Qwen BPE ranks, read from the installed `dashscope` distribution without importing it."""
    from importlib import metadata

    try:
        files = metadata.distribution("dashscope").files or []
    except metadata.PackageNotFoundError:
        pytest.fail("the Qwen GGUF tests read the Qwen vocabulary that `dashscope` ships: pip install -e '.[test]'")
    found = [f for f in files if f.name == "qwen.tiktoken"]
    assert found, "dashscope no longer ships qwen.tiktoken: pin the version that does in pyproject.toml"
    return found[0].locate()


def build_qwen_model(family: str, target) -> None:
    """A tiny random model of `family` with the published Qwen tokenizer (byte-level BPE, no BOS, ChatML)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643-151645, as in every Qwen release
    backend = TikTokenConverter(str(qwen_vocabulary()), pattern=QWEN_SPLIT, extra_special_tokens=specials).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen's tokenizer.json
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    target.mkdir(parents=True)
    save_tiny_model(family, tokenizer, target)


def train(model_dir, run) -> None:
    code = cli.main(["--recipe", "tiny-demo", "--output-dir", str(run), "--set", f"model.name_or_path={model_dir}",
                     "--set", "train.max_steps=2", "--set", "train.micro_batch_size=2", "--set", "data.max_rows=8",
                     "--set", "data.eval_path=null", "--set", "eval.exact_match=false"])
    assert code == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained two-step run per family (built lazily: each test asks for its family). `tiny-bpe` is a Qwen2
    with a byte-level BPE vocabulary trained here, which the converter does not recognise."""
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def run_for(family: str):
        if family not in made:
            model_dir = root / f"{family}-model"
            if family in SENTENCEPIECE_FAMILIES:
                build_sentencepiece_model(family, model_dir)
            elif family in BPE_ONLY_FAMILIES:
                build_qwen_model(family, model_dir)
            else:
                build_demo_model(tiny_spec(FAMILIES["qwen2"]), model_dir)
            train(model_dir, root / f"{family}-run")
            made[family] = root / f"{family}-run"
        return made[family]

    return run_for


def read_gguf(path):
    from gguf import GGUFReader

    return GGUFReader(path)


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", SENTENCEPIECE_FAMILIES + BPE_ONLY_FAMILIES)
def test_family_exports_gguf_verified_with_a_modelfile(runs, family, tmp_path, capsys):
    out = tmp_path / "gguf"
    code = cli.main(["export", str(runs(family)), "--output", str(out), "--format", "gguf"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "Verification of the GGUF read back" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "export.json", "model-f16.gguf"]
    report = json.loads((out / "export.json").read_text())
    assert report["verified"] and report["top1_agreement"] >= 0.95 and report["tokenization_checked"] >= 8

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs(family) / "adapter")
    gguf = read_gguf(out / "model-f16.gguf")
    qwen = family in BPE_ONLY_FAMILIES
    if qwen:  # byte-level BPE recognised by hash; Qwen adds no BOS
        assert field(gguf, "tokenizer.ggml.model") == "gpt2" and field(gguf, "tokenizer.ggml.pre") == "qwen2"
        assert tokenizer.bos_token is None and field(gguf, "tokenizer.ggml.add_bos_token") is False
    else:
        assert field(gguf, "tokenizer.ggml.model") in ("llama", "gemma")
        assert field(gguf, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
        assert field(gguf, "tokenizer.ggml.add_bos_token") is True
    assert field(gguf, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(gguf, "tokenizer.chat_template") == tokenizer.chat_template
    tokens, types = field(gguf, "tokenizer.ggml.tokens"), field(gguf, "tokenizer.ggml.token_type")
    assert types[tokens.index("<|im_end|>")] == 3, "a control token: llama.cpp keeps it whole and stops on it"

    text = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text.splitlines()
    # One stop per token that ends a turn: the EOS and the template's turn end (Qwen's EOS is <|im_end|> itself).
    stops = ["<|im_end|>"] if qwen else ["</s>", "<|im_end|>"]
    assert re.findall(r'^PARAMETER stop "(.*)"$', text, re.M) == stops
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "My parcel is late."},
                    {"role": "assistant", "content": "Sorry!"}, {"role": "user", "content": "Where is it?"}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert render_go_template(template_of(text), conversation) == expected


def test_a_tokenizer_the_converter_does_not_recognise_is_one_line(runs, tmp_path):
    run, out = runs("tiny-bpe"), tmp_path / "gguf"
    err = refused_cleanly(["export", str(run), "--output", str(out), "--format", "gguf"], 2,
                          "BPE pre-tokenizer was not recognized", watch=[tmp_path, run])
    assert "llama.cpp's converter could not convert" in err
    assert not out.exists()


def test_q8_0_is_verified_within_the_bars(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --output: the converter runs in its own directory
    out = tmp_path / "q8"
    assert cli.main(["export", str(runs("llama")), "--output", "q8", "--format", "gguf", "--quant", "q8_0"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["quant"] == "q8_0" and report["verified"]
    assert 0 < report["relative_logit_error"] < 0.05
    assert read_gguf(out / "model-q8_0.gguf").fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0



def test_adapter_only_gguf_is_read_back_and_named_in_the_modelfile(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --output, as above
    run, out = runs("llama"), tmp_path / "adapter-gguf"
    code = cli.main(["export", str(run), "--output", "adapter-gguf", "--format", "gguf-adapter"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter-f16.gguf", "export.json"]
    report = json.loads((out / "export.json").read_text())
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert report["verified"] and report["lora_alpha"] == adapter_config["lora_alpha"]
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as weights:
        assert report["lora_layers"] == sum(".lora_A." in key for key in weights.keys()) == 14  # 7 per layer
    assert 0 <= report["max_relative_update_error"] < 0.01
    reader = read_gguf(out / "adapter-f16.gguf")
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    lines = (out / "Modelfile").read_text().splitlines()
    assert "FROM ./base.gguf" in lines and "ADAPTER ./adapter-f16.gguf" in lines


def test_dora_adapter_is_refused_for_gguf_adapter_in_one_line(runs, tmp_path):
    import shutil

    adapter = tmp_path / "dora"
    shutil.copytree(runs("llama") / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    refused_cleanly(["export", str(adapter), "--output", str(tmp_path / "out"), "--format", "gguf-adapter"], 2,
                    "llama.cpp cannot apply DoRA adapters", watch=[tmp_path])


def test_gguf_options_that_do_not_apply_are_refused(runs, tmp_path):
    run = runs("llama")
    for extra, fragment in ((["--dtype", "bfloat16"], "--dtype does not apply to --format gguf"),
                            (["--no-verify"], "--no-verify does not apply to --format gguf")):
        refused_cleanly(["export", str(run), "--output", str(tmp_path / "o"), "--format", "gguf", *extra], 2, fragment,
                        watch=[tmp_path])
    refused_cleanly(["export", str(run), "--output", str(tmp_path / "o"), "--quant", "q8_0"], 2,
                    "--quant applies to --format gguf", watch=[tmp_path])


@pytest.mark.parametrize("family", SENTENCEPIECE_FAMILIES + BPE_ONLY_FAMILIES)
def test_llama_cpp_reads_the_export_as_transformers_does(runs, family, tmp_path):
    """Optional: llama-cpp-python compiles llama.cpp (about 10 to 18 minutes on 2 cores), so it is not a
    dependency. llama.cpp must tokenize a chat as training did and predict the same next tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qlora_trainer.deploy.gguf_verify import _read_back_config

    run, out = runs(family), tmp_path / "gguf"
    assert cli.main(["export", str(run), "--output", str(out), "--format", "gguf"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "My parcel is late."},
                                          {"role": "assistant", "content": "Sorry to hear that!"},
                                          {"role": "user", "content": "Where is it?"}], tokenize=False,
                                         add_generation_prompt=True)
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=256, logits_all=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=tokenizer.bos_token is not None, special=True)
    assert ids == tokenizer(text)["input_ids"]
    llm.eval(ids)
    base_config = AutoConfig.from_pretrained(json.loads((run / "adapter" / "adapter_config.json").read_text())
                                             ["base_model_name_or_path"])
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32,
                                                 config=_read_back_config(out, "model-f16.gguf", base_config))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    got = torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
    # The same f16 weights in two engines: logits within 1% (llama.cpp sums in its own order), and the same next
    # token wherever the top two are not a near tie.
    assert float((got - expected).norm() / expected.norm()) < 0.01
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.95


def test_llama_cpp_applies_the_adapter_gguf_as_peft_does(runs, tmp_path):
    """Optional, as above: Ollama's ADAPTER line is llama.cpp's LoRA over a base GGUF of the original weights."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_trainer.deploy.llama_cpp_converter import convert_model, space_after_special_tokens

    adapter, out = tmp_path / "adapter", tmp_path / "gguf"
    shutil.copytree(runs("llama") / "adapter", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")  # two steps barely move B: make the update large
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=generator).to(v.dtype) * 0.05 if ".lora_B." in k else v
               for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    assert cli.main(["export", str(adapter), "--output", str(out), "--format", "gguf-adapter"]) == 0
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    convert_model(Path(base_dir), out / "base.gguf", "f16", space_after_special_tokens(tokenizer))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "My parcel is late."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text)["input_ids"]
    scores = {}
    for name, lora in (("base", None), ("adapted", str(out / "adapter-f16.gguf"))):
        llm = llama_cpp.Llama(model_path=str(out / "base.gguf"), lora_path=lora, n_ctx=256, logits_all=True,
                              verbose=False)
        llm.eval(ids)
        scores[name] = torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, adapter)(input_ids=torch.tensor([ids])).logits[0]
    change = float((expected - scores["base"]).norm() / expected.norm())
    assert change > 0.1, "the adapter must change the logits for this test to mean anything"
    assert float((scores["adapted"] - expected).norm() / expected.norm()) < 0.01


def test_a_family_the_converter_lacks_is_refused_before_merging():
    from transformers import AutoConfig

    from qlora_trainer.deploy.gguf_export import check_family
    from qlora_trainer.errors import UserError

    for family in FAMILIES:  # every family the project trains is one the converter has
        check_family(AutoConfig.for_model(tiny_spec(FAMILIES[family])["model_type"],
                                          architectures=[_architecture(family)]))
    with pytest.raises(UserError, match=r"llama.cpp's converter \(llama-cpp-python [\d.]+\) cannot convert "
                                        r"OPTForCausalLM; export safetensors instead") as refused:
        check_family(AutoConfig.for_model("opt", architectures=["OPTForCausalLM"]))
    assert "\n" not in str(refused.value)


def _architecture(family: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[tiny_spec(FAMILIES[family])["model_type"]]
