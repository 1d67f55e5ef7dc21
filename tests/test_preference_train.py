"""Preference training on CPU with the real bitsandbytes, PEFT and TRL: DPO, ORPO and KTO train only the adapter
of the 4-bit base through the SFT path's trainer subclass, the tiny-dpo demo learns its held-out pairs, and a run
that fails mid-way ends as an SFT run does."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from helpers import REPO, fail_at_step, resolved_on_cpu, run_cli, tiny_recipe

from qlora_trainer.config.recipe_files import load_recipe
from qlora_trainer.dataset.data import load_data
from qlora_trainer.dataset.sequence_fit import fit_to_tokenizer
from qlora_trainer.errors import TrainingFailed
from qlora_trainer.files.run_dir import latest_checkpoint
from qlora_trainer.loading.model import frozen_dtypes, load_base_model, load_tokenizer
from qlora_trainer.training.train import RunOptions, train
from qlora_trainer.training.trainer_setup import build_trainer

PAIRS = REPO / "recipes" / "data" / "complaints-pref-train.jsonl"
HELDOUT = REPO / "recipes" / "data" / "complaints-pref-heldout.jsonl"
TRL_TRAINERS = {"dpo": "DPOTrainer", "orpo": "ORPOTrainer", "kto": "KTOTrainer"}


def preference_recipe(tmp_path, model_dir, method, **train):
    """The helpers' tiny recipe on the demo pairs, with every `auto` settled as on the CPU."""
    path = tiny_recipe(tmp_path / f"{method}.yaml", model_dir,
                       data={"path": str(PAIRS), "format": "auto", "max_rows": 32},
                       train={"method": method, "learning_rate": 2e-3, "gradient_checkpointing": True,
                              "activation_offloading": False, "packing": False, "padding_free": False,
                              "kernels": "none", **train})
    return load_recipe(str(path))[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_each_method_trains_only_the_adapter_of_the_4bit_base(tiny_model_dir, tmp_path, method):
    recipe = preference_recipe(tmp_path, tiny_model_dir, method, max_steps=3)
    tokenizer = load_tokenizer(recipe.model)
    data = fit_to_tokenizer(load_data(recipe.data, 0, method), recipe.data, tokenizer, 64, "tiny")
    (tmp_path / "run").mkdir()
    trainer = build_trainer(resolved_on_cpu(recipe, data), load_base_model(recipe.model, recipe.quantization, "cpu"), tokenizer, data,
                            tmp_path / "run", "cpu")
    assert TRL_TRAINERS[method] in [cls.__name__ for cls in type(trainer).__mro__], "TRL's trainer, our subclass"
    assert hasattr(trainer, "save_adapter"), "the SFT path's checkpointing subclass"
    params = dict(trainer.model.named_parameters())
    four_bit = {n: p.detach().clone() for n, p in params.items() if p.dtype == torch.uint8}
    lora_b = {n: p.detach().clone() for n, p in params.items() if "lora_B" in n}
    assert len(four_bit) == 14 and lora_b
    assert {p.dtype for n, p in params.items() if p.requires_grad} == {torch.bfloat16}
    # ORPO's own PEFT path would upcast embeddings, norms and lm_head to fp32 (prepare_model_for_kbit_training).
    assert set(frozen_dtypes(trainer.model).values()) == {"bfloat16"}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert all("rewards/margins" in h for h in logged[1:]), "the method's own metrics are logged"
    assert all(torch.equal(four_bit[n], params[n]) for n in four_bit), "the 4-bit base changed"
    assert all(not torch.equal(lora_b[n], params[n]) for n in lora_b), "every LoRA B matrix trained"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and "rewards/margins" in rows[-1]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """The README's tiny-dpo demo as shipped (about a minute on CPU)."""
    run = tmp_path_factory.mktemp("dpo") / "run"
    result = run_cli("--recipe", "tiny-dpo", "--output-dir", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    (run / "stdout.txt").write_text(result.stdout)
    return run


@pytest.mark.slow
def test_tiny_dpo_demo_learns_its_held_out_pairs(dpo_run):
    summary = json.loads((dpo_run / "summary.json").read_text())
    before, after = summary["preference_before"], summary["preference_after"]
    assert summary["method"] == "dpo" and summary["steps"] == 200
    assert before["pairs"] == after["pairs"] == 100
    assert before["accuracy"] < 0.8 and after["accuracy"] >= 0.95, (before, after)
    # The new adapter starts at zero: the trained model is the reference itself, so the margin starts at zero.
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert after["reward_margin"] > 1.0 and after["logp_margin"] > before["logp_margin"] + 5
    stdout = (dpo_run / "stdout.txt").read_text()
    assert "Held-out preference before training: accuracy" in stdout
    assert "held-out preference accuracy" in stdout and "reward margin" in stdout
    # The same margin as TRL's own eval computes it, at the same step, over the same pairs.
    final_eval = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()
                  if "eval_rewards/margins" in line][-1]
    assert final_eval["step"] == 200
    assert after["reward_margin"] == pytest.approx(final_eval["eval_rewards/margins"], rel=0.05)
    assert "eval_perplexity" not in final_eval, "exp(DPO loss) is no perplexity"
    for name in ("recipe.yaml", "estimate.json", "loss.png", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer.json", "base_fingerprint.json"):
        assert (dpo_run / name).is_file(), name
    assert not (dpo_run / "adapter" / "ref").exists()


@pytest.mark.slow
def test_a_preference_run_failing_mid_way_keeps_its_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    fail_at_step(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "x")))
    recipe = preference_recipe(tmp_path, tiny_model_dir, "dpo", max_steps=4, save_steps=2)
    run = tmp_path / "run"
    with pytest.raises(TrainingFailed) as info:
        train(recipe, RunOptions(recipe_name="fail", output_dir=run))
    assert "No space left on device" in str(info.value) and "--resume" in str(info.value)
    assert latest_checkpoint(run) == run / "checkpoints" / "checkpoint-2"
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_a_dpo_run_exports_and_generates_its_preferred_labels(dpo_run, tmp_path):
    result = run_cli("export", str(dpo_run), "--output", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "merged" / "export.json").read_text())
    # The export's own bars (a few near-ties of a tiny random model may flip in bf16), and a small logit error.
    assert report["verified"] and report["relative_logit_error"] < 0.01, report
    # Greedy decoding from the adapter and from its export writes the preferred label for (nearly) every held-out
    # tweet of each label: all 100 prompts in one `generate --file` call, so that no single near-tie decides.
    pairs = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    for source in (dpo_run, tmp_path / "merged"):
        answers = greedy_answers(source, pairs, tmp_path)
        for label in (" complaint", " no complaint"):
            of_label = [(p["prompt"], a) for p, a in zip(pairs, answers) if p["chosen"] == label]
            right = [a for _, a in of_label if a.startswith(label)]
            assert len(of_label) >= 30 and len(right) >= 0.9 * len(of_label), (source, label, of_label)


def greedy_answers(source, pairs, tmp_path) -> list[str]:
    """What `generate` writes (3 new tokens, greedy) after each pair's prompt, in order."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs))
    result = run_cli("generate", str(source), "--file", str(prompts), "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    # Each prompt is printed as ">>> PROMPT" on its own line, then the answer streamed after it.
    blocks = result.stdout.split(">>> ")[1:]
    assert [b[:len(p["prompt"]) + 1] for b, p in zip(blocks, pairs)] == [p["prompt"] + "\n" for p in pairs], \
        result.stdout[-2000:]
    return [b[len(p["prompt"]) + 1:].rstrip("\n") for b, p in zip(blocks, pairs)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_killed_preference_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path, method):
    from test_resume_fallback import assert_ended_as_uninterrupted, killed_copy, resume_argv, run_main

    path = tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, data={"path": str(PAIRS), "format": "auto", "max_rows": 64},
                       train={"method": method, "learning_rate": 2e-3, "save_total_limit": 5})
    finished = tmp_path / "finished"
    code, _, err = run_main(["--recipe", str(path), "--output-dir", str(finished)])
    assert code == 0, err[-3000:]
    run = killed_copy(finished, tmp_path / "run", drop_checkpoints=("checkpoint-4",))
    code, _, err = run_main(resume_argv(run))
    assert code == 0, err[-3000:]
    assert_ended_as_uninterrupted(run, finished, range(3, 5))
    assert json.loads((run / "summary.json").read_text())["method"] == method


def test_a_resume_with_another_method_is_refused(tiny_model_dir, tmp_path):
    from helpers import refused_cleanly

    run = tmp_path / "run"
    run.mkdir()
    sft = tiny_recipe(tmp_path / "sft.yaml", tiny_model_dir)
    (run / "recipe.yaml").write_text(sft.read_text())
    (run / "estimate.json").write_text("{}")  # what makes a directory a run that --resume may continue
    dpo = tiny_recipe(tmp_path / "dpo.yaml", tiny_model_dir, data={"path": str(PAIRS), "format": "auto"},
                      train={"method": "dpo"})
    refused_cleanly(["--recipe", str(dpo), "--output-dir", str(run), "--resume"], 2,
                    "--resume: train.method is dpo but the run used sft", [run])
