"""Export and inference on the trained demo adapter: the merged model reproduces the 4-bit model plus adapter,
loads without PEFT or bitsandbytes, and bad requests are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TIMEOUT, run_cli
from peft import LoraConfig, get_peft_model

from qlora_trainer.deploy import export as export_lib
from qlora_trainer.deploy.adapter_source import find_adapter
from qlora_trainer.deploy.adapters import AdapterSet
from qlora_trainer.errors import UserError
from qlora_trainer.loading.model import load_base_model

HELDOUT = REPO / "recipes" / "data" / "complaints-heldout.jsonl"
PROMPTS = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines()[:6]]
LABELS = [json.loads(line)["completion"].strip() for line in HELDOUT.read_text().splitlines()[:6]]

# Run in a fresh interpreter where importing peft or bitsandbytes fails, as on a machine without them.
LOAD_WITHOUT_PEFT = """
import sys, json, torch
sys.modules["peft"] = None
sys.modules["bitsandbytes"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path)
tok = AutoTokenizer.from_pretrained(path)
logits = [model(**tok(p, return_tensors="pt")).logits[0].float() for p in prompts]
torch.save({"logits": logits, "dtype": str(model.dtype)}, out)
"""


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    for method in ("dequantized", "original"):
        result = run_cli("export", str(demo_run), "--output", str(out / method), "--base-weights", method)
        assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference_logits(demo_run):
    """The trained model as training saw it: the 4-bit base plus the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    source = find_adapter(demo_run)
    model = PeftModel.from_pretrained(load_base_model(source.base, source.quantization, "cpu"), source.adapter_dir)
    tok = AutoTokenizer.from_pretrained(source.adapter_dir)
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0].float() for p in PROMPTS]


def logits_without_peft(path, tmp_path):
    out = tmp_path / "logits.pt"
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(path), json.dumps(PROMPTS), str(out)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


def agreement(reference, candidate):
    ref, cand = torch.cat(reference), torch.cat(candidate)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).float().mean().item()
    return top1, ((ref - cand).norm() / ref.norm()).item()


@pytest.mark.slow
def test_export_loads_without_peft_and_matches_the_trained_model(exported, reference_logits, tmp_path):
    loaded = logits_without_peft(exported / "dequantized", tmp_path)
    assert loaded["dtype"] == "torch.float16"
    top1, error = agreement(reference_logits, loaded["logits"])
    assert top1 >= 0.99
    assert error < 0.02, "only 16-bit rounding separates the export from the 4-bit model + adapter"
    config = json.loads((exported / "dequantized" / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "README.md", "export.json"):
        assert (exported / "dequantized" / name).is_file(), name
    assert not list((exported / "dequantized").glob("*.bin"))
    report = json.loads((exported / "dequantized" / "export.json").read_text())
    assert report["verified"] and report["method"] == "dequantized"


@pytest.mark.slow
def test_merging_into_the_original_weights_drifts_and_says_so(exported, reference_logits, tmp_path):
    report = json.loads((exported / "original" / "export.json").read_text())
    assert report["method"] == "original"
    _, error_exact = agreement(reference_logits, logits_without_peft(exported / "dequantized", tmp_path)["logits"])
    _, error_original = agreement(reference_logits, logits_without_peft(exported / "original", tmp_path)["logits"])
    assert error_original > 3 * error_exact
    assert report["relative_logit_error"] == pytest.approx(error_original, rel=0.5)
    assert "original 16-bit base weights" in (exported / "original" / "README.md").read_text()
    card = (exported / "dequantized" / "README.md").read_text()
    assert "demo:tiny-llama" in card and "/adapter`" in card and str(REPO) not in card and "/tmp" not in card


def test_existing_output_is_refused(demo_run, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = run_cli("export", str(demo_run), "--output", str(target))
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (target / "keep.txt").read_text() == "mine"


def test_mismatched_base_is_refused_before_any_work(demo_run, tiny_model_dir, tmp_path):
    result = run_cli("export", str(demo_run), "--output", str(tmp_path / "out"), "--base", str(tiny_model_dir))
    assert result.returncode == 2 and "does not match base" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_adapter_files_are_refused(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="missing adapter_model.safetensors"):
        find_adapter(tmp_path / "adapter")


def test_a_failure_mid_write_leaves_nothing_behind(demo_run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(export_lib, "_write_model_card", fail)
    with pytest.raises(OSError, match="injected"):
        export_lib.export(export_lib.ExportOptions(source=demo_run, output=tmp_path / "out", verify=False))
    assert list(tmp_path.iterdir()) == [], "no output and no temporary directory remain"


@pytest.mark.slow
def test_generate_produces_the_trained_label(demo_run, exported, tmp_path):
    # The demo's prompts span two lines: on the command line the break is written \n.
    result = run_cli("generate", str(demo_run), "--prompt", PROMPTS[0].replace("\n", "\\n"), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].strip() == LABELS[0]
    # A JSONL file of training-style rows gives one prompt per row, each generated in turn.
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]), encoding="utf-8")
    result = run_cli("generate", str(exported / "dequantized"), "--file", str(rows), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [block.strip().splitlines()[-1].strip() for block in result.stdout.split(">>> ")[1:]]
    assert answers == LABELS[:3]


def test_one_base_serves_several_adapters(demo_run, tmp_path):
    source = find_adapter(demo_run)
    # A second adapter on the same base: random (non-zero) LoRA weights, as a stand-in for another task.
    base = load_base_model(source.base, source.quantization, "cpu")
    other = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    other.save_pretrained(tmp_path / "other")
    source_tokenizer_files = list(source.adapter_dir.glob("tokenizer*")) + list(source.adapter_dir.glob("chat_template*"))
    for f in source_tokenizer_files:
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())

    models = AdapterSet(str(source.base.name_or_path))
    models.add("complaints", demo_run)
    base_weight = models.base.model.layers[0].self_attn.q_proj.weight
    first = models.logits(PROMPTS[0])
    assert models.generate(PROMPTS[0], max_new_tokens=4).strip() == LABELS[0]

    models.add("other", tmp_path / "other")
    assert models.active == "other" and models.names == ["complaints", "other"]
    assert not torch.allclose(models.logits(PROMPTS[0]), first)
    models.use("complaints")
    assert torch.equal(models.logits(PROMPTS[0]), first), "switching back restores the first adapter exactly"
    assert models.base.model.layers[0].self_attn.q_proj.weight is base_weight, "the base was never reloaded"
    with pytest.raises(UserError, match="no adapter named 'nope'"):
        models.use("nope")
