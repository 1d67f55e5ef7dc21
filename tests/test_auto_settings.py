"""The `auto` training settings: the planner's choice for a GPU budget, the kernels and packing rules, the memory
cap's validation, and the three places that report the same choice (estimate --json, --dry-run, summary.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

from qlora_trainer import cli
from qlora_trainer.config.recipe_files import load_recipe
from qlora_trainer.config.resolved_recipe import concrete
from qlora_trainer.errors import UserError
from qlora_trainer.estimate import auto_settings, fit_rule
from qlora_trainer.estimate.auto_settings import Budget, plan, relative_time_per_token, resolve
from qlora_trainer.estimate.memory import GIB, estimate
from qlora_trainer.estimate.recipe_settings import settings_from_recipe
from qlora_trainer.estimate.shape_lookup import shape_for_model

BUDGETS = (8, 12, 24, 80)

# The tests install liger-kernel (the test extra); where it is missing, the choices that depend on its kernels
# are not what these tests state, and they are skipped rather than failed.
needs_liger = pytest.mark.skipif(not auto_settings.liger_model_types(),
                                 reason="liger-kernel is not installed: pip install -e '.[test]'")


def _recipe(name: str, *overrides: str):
    recipe, _ = load_recipe(name, list(overrides))
    return recipe, shape_for_model(recipe.model.name_or_path)


@pytest.mark.parametrize("name", ["llama7b-r8", "llama3-8b-r16"])
def test_auto_choice_gets_faster_with_memory_and_stays_under_the_limit(name):
    recipe, shape = _recipe(name)
    assert recipe.train.micro_batch_size == "auto" and recipe.train.gradient_checkpointing == "auto"
    plans = {gib: plan(recipe, shape, Budget(gib, f"test {gib}", host_gib=64), on_gpu=True) for gib in BUDGETS}
    speed = [_time_per_token(plans[g]) for g in BUDGETS]
    assert speed == sorted(speed, reverse=True), f"a bigger card got a slower choice: {speed}"
    for gib, chosen in plans.items():
        assert chosen.fits, f"{name} at {gib} GiB: {chosen.describe()}"
        # The prediction is recomputed from the resolved recipe, the way the run will see it.
        settled, _ = resolve(recipe, chosen)
        predicted = estimate(shape, settings_from_recipe(settled)).total / GIB
        assert predicted == pytest.approx(chosen.predicted_gib)
        assert predicted <= gib * (1 - fit_rule.SAFETY_MARGIN)
        # The global batch stays as written; accumulation follows the micro-batch.
        assert settled.train.micro_batch_size * settled.train.accumulation_steps() == recipe.train.global_batch()
    assert plans[24].micro_batch_size >= 4


def _time_per_token(chosen) -> float:
    return relative_time_per_token(chosen.micro_batch_size, chosen.gradient_checkpointing, chosen.activation_offloading)


def _fitting_candidates(recipe, shape, kernels: str, attn: str, gib: float, host_gib: float | None = None):
    """Every micro-batch / checkpointing / offloading combination the planner considers that fits `gib`."""
    for micro in (1, 2, 4, 8, 16):
        for checkpointing in (False, True):
            for offloading in (False, True):
                if offloading and not checkpointing:
                    continue  # not a candidate: the speed model describes offloading with checkpointing only
                settled = concrete(recipe, model={"attn_implementation": attn}, train=dict(
                    micro_batch_size=micro, gradient_checkpointing=checkpointing, activation_offloading=offloading,
                    kernels=kernels, packing=False, padding_free=False))
                est = estimate(shape, settings_from_recipe(settled))
                pinned_ok = host_gib is None or est.activation_offload_bytes / GIB <= 0.5 * host_gib
                if fit_rule.fits(est.total / GIB, gib) and pinned_ok:
                    yield micro, checkpointing, offloading


@pytest.mark.parametrize("gib", [12, 24, 80])
def test_the_choice_is_the_fastest_candidate_that_fits(gib):
    recipe, shape = _recipe("llama7b-r8")
    chosen = plan(recipe, shape, Budget(gib, "test"), on_gpu=True)
    candidates = list(_fitting_candidates(recipe, shape, chosen.kernels, chosen.attn_implementation, gib))
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing, chosen.activation_offloading) in candidates
    assert _time_per_token(chosen) == min(relative_time_per_token(*c) for c in candidates)


def test_a_large_card_turns_checkpointing_off_when_that_is_faster():
    """At 80 GiB micro-batch 16 with checkpointing fits, but a smaller micro-batch that skips the recomputed
    forward is faster by the measured speed model (on the H100: micro-batch 2 without checkpointing 9,744
    tokens/s, micro-batch 4 with it 7,411)."""
    recipe, shape = _recipe("llama7b-r8")
    chosen = plan(recipe, shape, Budget(80, "test"), on_gpu=True)
    assert chosen.gradient_checkpointing is False
    assert _time_per_token(chosen) < relative_time_per_token(16, True, False)


@needs_liger
def test_offloading_is_not_chosen_beyond_the_ram_it_would_pin():
    recipe, shape = _recipe("llama7b-r8")
    roomy = plan(recipe, shape, Budget(24, "test", host_gib=64), on_gpu=True)
    assert roomy.activation_offloading, roomy.describe()  # the fastest at 24 GiB offloads, given the RAM
    settled, _ = resolve(recipe, roomy)
    pinned = estimate(shape, settings_from_recipe(settled)).activation_offload_bytes / GIB
    tight = plan(recipe, shape, Budget(24, "test", host_gib=pinned), on_gpu=True)  # pinning it would take all RAM
    assert not tight.activation_offloading and tight.fits, tight.describe()
    assert _time_per_token(tight) > _time_per_token(roomy)
    assert any("CPU RAM" in note and "not chosen" in note for note in tight.notes), tight.notes
    assert _time_per_token(tight) == min(relative_time_per_token(*c) for c in _fitting_candidates(
        recipe, shape, tight.kernels, tight.attn_implementation, 24, host_gib=pinned))


def test_explicit_values_are_obeyed_and_only_auto_keys_are_chosen():
    recipe, shape = _recipe("llama7b-r8", "train.micro_batch_size=2", "train.gradient_checkpointing=true")
    chosen = plan(recipe, shape, Budget(80, "test"), on_gpu=True)
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing) == (2, True)
    assert set(chosen.chosen) == {"activation_offloading", "kernels", "attn_implementation"}


def test_without_a_budget_auto_means_the_safe_defaults():
    recipe, shape = _recipe("llama7b-r8")
    chosen = plan(recipe, shape, Budget(None, "none"), on_gpu=False)
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing, chosen.activation_offloading, chosen.kernels) == (
        1, True, False, "none")


def test_speed_model_orders_the_measured_h100_runs():
    """shared/calibration: mb1 ckpt on 3,405 < mb1 off 4,944 < mb4 on 7,411 < mb2 off 9,744 tokens/s."""
    measured = [((1, True), 3405), ((1, False), 4944), ((4, True), 7411), ((2, False), 9744)]
    predicted = [1 / relative_time_per_token(m, c, False) for (m, c), _ in measured]
    assert predicted == sorted(predicted)
    assert relative_time_per_token(4, True, True) > relative_time_per_token(4, True, False)


def test_nothing_fits_picks_the_smallest_and_says_so():
    recipe, shape = _recipe("llama3-8b-r16")
    chosen = plan(recipe, shape, Budget(4, "test"), on_gpu=True)
    assert not chosen.fits
    assert (chosen.micro_batch_size, chosen.gradient_checkpointing) == (1, True)
    assert "nothing fits" in chosen.describe()


# ---------------------------------------------------------------- the same choice in three places


def test_estimate_json_and_dry_run_report_the_same_choice(capsys, tmp_path):
    assert cli.main(["estimate", "--recipe", "llama7b-r8", "--gpu-memory", "24", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recipe, shape = _recipe("llama7b-r8")
    chosen = plan(recipe, shape, Budget(24, "t"), on_gpu=True)
    assert (result["micro_batch_size"], result["gradient_checkpointing"], result["activation_offloading"]) == (
        chosen.micro_batch_size, chosen.gradient_checkpointing, chosen.activation_offloading)
    assert result["inputs"]["batch_size"] == result["micro_batch_size"]
    assert result["auto"]["budget_gib"] == 24 and result["fits"] is True

    assert cli.main(["--recipe", "llama7b-r8", "--dry-run", "--gpu-memory", "24", "--output-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    auto_line = next(line for line in out.splitlines() if line.strip().startswith("auto "))
    assert f"micro-batch {result['micro_batch_size']}, checkpointing " in auto_line
    assert "of 24.0 GiB predicted" in auto_line
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_a_cpu_run_records_what_auto_became(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["auto_settings"]["chosen"] == ["activation_offloading", "kernels", "attn_implementation"]
    levers = {k: summary["levers"][k] for k in ("activation_offloading", "kernels", "packing", "padding_free")}
    assert levers == {"activation_offloading": False, "kernels": "none", "packing": False, "padding_free": False}
    saved = yaml.safe_load((demo_run / "recipe.yaml").read_text())
    assert saved["train"]["kernels"] == "none" and saved["train"]["activation_offloading"] is False
    assert saved["model"]["attn_implementation"] == summary["auto_settings"]["attn_implementation"] == "sdpa"
    assert "# auto settings" in (demo_run / "recipe.yaml").read_text()


# ---------------------------------------------------------------- the cap and the levers' keys


@pytest.mark.parametrize("value", ["-4", "0", "nan", "inf"])
def test_gpu_memory_must_be_finite_and_positive(value, capsys):
    for argv in (["estimate", "--recipe", "llama7b-r8", "--gpu-memory", value],
                 ["--recipe", "llama7b-r8", "--dry-run", "--gpu-memory", value]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--gpu-memory must be a positive number" in err[0]


@pytest.mark.parametrize("value", ["0", "-1", ".nan", ".inf", "lots"])
def test_gpu_memory_gib_key_is_validated(value):
    with pytest.raises(UserError, match="train.gpu_memory_gib"):
        load_recipe("llama7b-r8", [f"train.gpu_memory_gib={value}"])


@pytest.mark.parametrize("key,value", [("micro_batch_size", "0"), ("micro_batch_size", "many"),
                                       ("micro_batch_size", "true"), ("gradient_checkpointing", "sometimes"),
                                       ("activation_offloading", "1"), ("kernels", "triton"), ("packing", "maybe")])
def test_lever_keys_reject_bad_values_naming_the_key(key, value):
    with pytest.raises(UserError, match=f"train.{key}"):
        load_recipe("llama7b-r8", [f"train.{key}={value}"])


@needs_liger
def test_kernels_follow_liger_support_and_the_device():
    recipe, shape = _recipe("llama7b-r8")
    assert auto_settings.choose_kernels(recipe, "llama", on_gpu=True) == ("liger", [])
    assert auto_settings.choose_kernels(recipe, "llama", on_gpu=False) == ("none", [])
    kernels, notes = auto_settings.choose_kernels(recipe, "bert", on_gpu=True)
    assert kernels == "none" and "no kernels for model type 'bert'" in notes[0]
    liger = recipe.replaced("train", kernels="liger")
    with pytest.raises(UserError, match="train.kernels: liger needs a CUDA GPU"):
        auto_settings.choose_kernels(liger, "llama", on_gpu=False)
    with pytest.raises(UserError, match="no kernels for model type 'bert'"):
        auto_settings.choose_kernels(liger, "bert", on_gpu=True)


def test_explicit_cuda_only_levers_are_refused_on_the_cpu(tiny_model_dir, write_recipe, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    path = write_recipe(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{path: {data}}}\n"
                        "train: {seq_len: 64, max_steps: 1, activation_offloading: true}\n")
    assert cli.main(["--recipe", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.activation_offloading: true needs a CUDA GPU" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mean,on_gpu,attn,expected", [
    (300, True, "sdpa", True),      # short rows on a GPU: packed
    (1500, True, "sdpa", False),    # rows over half of seq_len: not worth it
    (300, False, "sdpa", False),    # the CPU keeps today's defaults
    (300, True, "eager", False),    # eager attention over a padding-free row costs micro-batch^2 memory
])
def test_auto_packing(mean, on_gpu, attn, expected):
    recipe, shape = _recipe("llama7b-r8", f"model.attn_implementation={attn}")
    chosen = plan(recipe, shape, Budget(80 if on_gpu else None, "test"), on_gpu=on_gpu)
    settled, notes = resolve(recipe, chosen, "text", mean)
    assert (settled.train.packing, settled.train.padding_free) == (expected, expected)
    assert notes and f"packing {'on' if expected else 'off'}" in notes[0]
    pinned = recipe.replaced("train", packing=False, padding_free=False)
    settled, notes = resolve(pinned, chosen, "text", mean)
    assert (settled.train.packing, settled.train.padding_free, notes) == (False, False, [])


def test_resolving_leaves_no_auto_and_cannot_be_changed():
    """The run takes only the resolved recipe: every `auto` settled (the data format as detected), and frozen."""
    import pydantic

    recipe, shape = _recipe("llama7b-r8")
    auto_keys = [key for key, value in recipe.train.model_dump().items() if value == "auto"]
    assert {"micro_batch_size", "packing", "kernels"} <= set(auto_keys)
    chosen = plan(recipe, shape, Budget(24, "test"), on_gpu=True)
    resolved, _ = resolve(recipe, chosen, "alpaca", 300)
    dumped = resolved.model_dump()
    assert [f"{s}.{k}" for s, section in dumped.items() if isinstance(section, dict)
            for k, v in section.items() if v == "auto"] == []
    assert (resolved.train.micro_batch_size, resolved.data.format) == (chosen.micro_batch_size, "alpaca")
    assert resolved.model.attn_implementation == chosen.attn_implementation == "sdpa"
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        resolved.train.micro_batch_size = 1
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        resolved.lora.r = 1
    with pytest.raises(pydantic.ValidationError, match="packing"):
        concrete(recipe, model={"attn_implementation": "sdpa"}, train=chosen.levers())  # packing still auto


def test_preference_methods_never_pack_and_orpo_never_offloads():
    for method in ("dpo", "orpo"):
        r, shape = _recipe("llama3-8b-dpo-r16", f"train.method={method}")
        chosen = plan(r, shape, Budget(24, "test", host_gib=1000), on_gpu=True)
        settled, notes = resolve(r, chosen, "preference", 10)
        assert (settled.train.packing, settled.train.padding_free, notes) == (False, False, [])
        if method == "orpo":
            assert chosen.activation_offloading is False and "activation_offloading" not in chosen.chosen


def test_regional_compile_wraps_each_decoder_layer(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_trainer.training.speed_levers import compile_decoder_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert compile_decoder_layers(model) == model.config.num_hidden_layers
    layers = model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert model.lm_head._compiled_call_impl is None  # TRL's fused LM head stays eager


LIGER_PROBE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
from qlora_trainer.training.speed_levers import apply_kernels
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
before = type(model.model.norm).forward
apply_kernels(model, "liger")
model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
layer = model.base_model.model.model.layers[0]
print(model.base_model.model.model.norm.forward.__func__.__module__, layer.mlp.forward.__func__.__module__,
      type(layer.mlp.gate_proj).__name__)
"""


@needs_liger
def test_liger_kernels_patch_the_instance_and_keep_lora(tiny_model_dir):
    """Patching runs on any machine (running the kernels needs CUDA). In its own process: liger also replaces
    module-level functions of transformers' Llama, which the rest of the CPU suite must not see."""
    out = subprocess.run([sys.executable, "-c", LIGER_PROBE, str(tiny_model_dir)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith("liger_kernel") and out[1].startswith("liger_kernel")
    assert out[2] == "Linear"  # PEFT's LoRA Linear wraps the projections that liger's SwiGLU calls


@pytest.mark.slow
def test_bench_speed_smoke_runs_every_path_on_cpu(tmp_path):
    """tools/bench_speed.py --device cpu: our CLI path and the plain TRL + PEFT script train on the same tiny
    random model and rows; Unsloth, not installed here, is reported as skipped; the ratios come out."""
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_speed.py"), "--device", "cpu", "--runs", "ours-auto,trl-peft,unsloth",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"ours-auto", "trl-peft", "unsloth"}
    assert runs["ours-auto"]["tokens_per_s"] > 0 and runs["trl-peft"]["tokens_per_s"] > 0
    assert runs["ours-auto"]["levers"]["micro_batch_size"] == 1  # auto on the CPU: the safe default
    assert "skipped" in runs["unsloth"]
    assert report["ratios"] == {} and "smoke" in report["note"]  # CPU timings are not a result
    assert report["seq_len"] == 64 and report["steps"] == 3
    lines = proc.stdout.splitlines()
    assert any(re.match(r"ours-auto\s+[\d,]+ tokens/s", line) for line in lines), proc.stdout  # read by people
    assert any(line.startswith("unsloth") and "skipped" in line for line in lines)


def test_bench_speed_ratios_compare_ours_with_each_run():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("bench_speed", REPO / "tools" / "bench_speed.py")
    bench = module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = [{"run": "ours-auto", "tokens_per_s": 300.0, "peak_gib_nvidia_smi": 6.0},
               {"run": "trl-peft", "tokens_per_s": 100.0, "peak_gib_nvidia_smi": 12.0},
               {"run": "unsloth-mb1", "tokens_per_s": 150.0}, {"run": "unsloth-mb4", "tokens_per_s": 250.0}]
    assert bench.ratios(results) == {"speed_vs_trl-peft": 3.0, "memory_vs_trl-peft": 0.5, "speed_vs_unsloth-best": 1.2}


@pytest.mark.slow
def test_tools_on_the_cpu_write_nothing_into_the_repository(tmp_path):
    """A smoke run of measure_vram writes its line under --workdir, not into benchmarks/ (GPU results only)."""
    before = sorted((REPO / "benchmarks").rglob("*"))
    shrink = json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1})
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "measure_vram.py"), "--device", "cpu", "--arch",
                           "llama-3.1-8b", "--seq-len", "32", "--batch-size", "1", "--steps", "1", "--config-override",
                           shrink, "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted((REPO / "benchmarks").rglob("*")) == before
    assert json.loads((tmp_path / "results-cpu.jsonl").read_text().splitlines()[-1])["seq_len"] == 32
    assert re.search(r"llama-3.1-8b r=8 seq 32 x 1, checkpointing on, sdpa: predicted [\d.]+ GiB", proc.stdout)


HEADER_CLAIM = re.compile(r"\b(\d+)( with activation offloading| without)? on (\d+) GB\b")


AUTO_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")
                      if yaml.safe_load(p.read_text())["train"].get("micro_batch_size") == "auto")


@needs_liger
@pytest.mark.parametrize("path", AUTO_RECIPES, ids=lambda p: p.stem)
def test_recipe_headers_state_the_planners_choice(path):
    """A recipe whose micro-batch is `auto` says in its header what the planner picks on a few cards ("8 with
    activation offloading on 16 GB"), and that is what the planner really picks there: the comments cannot
    drift from the estimator."""
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    claims = HEADER_CLAIM.findall(header)
    assert claims, f"{path.name}: the header should say which micro-batch auto picks (e.g. '4 on 12 GB')"
    recipe, shape = _recipe(path.stem)
    for micro, offloading, gib in claims:
        chosen = plan(recipe, shape, Budget(float(gib), "header"), on_gpu=True)
        assert chosen.micro_batch_size == int(micro), f"{path.name}: {gib} GB -> {chosen.describe()}"
        if offloading:
            assert chosen.activation_offloading == (offloading == " with activation offloading"), chosen.describe()


# ---------------------------------------------------------------- one fit rule


def test_fit_the_fit_line_the_planner_and_the_stop_apply_one_rule(capsys):
    """What `estimate --fit` proposes, applied, fits in the fit line, the plan and the check before loading; and
    a run within the budget but inside its safety margin fits in none of them."""
    from qlora_trainer.errors import WontFitError
    from qlora_trainer.estimate.estimate_output import estimate_json, format_estimate
    from qlora_trainer.estimate.fit_search import check_fits

    assert cli.main(["estimate", "--recipe", "gemma2-9b-r16", "--gpu-memory", "8", "--fit", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["fit"]
    assert found["fits"]
    recipe, shape = _recipe("gemma2-9b-r16", f"train.seq_len={found['seq_len']}",
                            f"train.micro_batch_size={found['micro_batch_size']}")
    chosen = plan(recipe, shape, Budget(8, "test"), on_gpu=True)
    assert chosen.fits, chosen.describe()
    est = estimate(shape, settings_from_recipe(resolve(recipe, chosen)[0]))
    assert "on a 8 GiB GPU: fits" in format_estimate(est, 8)
    check_fits(est, shape, 8, "test", force=False)

    # Inside the margin: 97% of the budget is under the budget but over what the rule allows.
    budget = est.total / GIB / 0.97
    assert estimate_json(est, budget)["fits"] is False
    assert "does NOT fit" in format_estimate(est, budget)
    with pytest.raises(WontFitError):
        check_fits(est, shape, budget, "test", force=False)
    fixed, _ = resolve(recipe, chosen)
    assert not plan(fixed, shape, Budget(budget, "test"), on_gpu=True).fits


def test_an_estimate_that_does_not_fit_names_changes_that_would(capsys):
    assert cli.main(["estimate", "--recipe", "llama7b-r8", "--gpu-memory", "8", "--set", "train.micro_batch_size=8",
                     "--set", "train.gradient_checkpointing=true", "--set", "train.activation_offloading=false"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out
    line = next(line for line in out.splitlines() if "to fit, try:" in line)
    sizes = [float(g) for g in re.findall(r"\((\d+\.\d) GiB\)", line)]
    assert sizes and all(size <= 8 * (1 - fit_rule.SAFETY_MARGIN) + 0.05 for size in sizes), line
