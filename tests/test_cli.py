"""The command line as a user meets it: one-line errors with DESIGN.md's exit codes, no tracebacks,
nothing written that looks like a finished run."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, TIMEOUT, run_cli

from qlora_trainer.cli import main


@pytest.fixture
def cli(capsys):
    """Run the command line in this process (fast); `run_cli` runs it in a fresh one where that matters."""

    class Result:
        def __init__(self, code, captured):
            self.returncode, self.stdout, self.stderr = code, captured.out, captured.err

    def invoke(*args: str) -> Result:
        code = main(list(args))
        return Result(code, capsys.readouterr())

    return invoke


def assert_one_line_error(result, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("qlora-trainer: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_recipes_lists_each_recipe_with_a_description():
    result = run_cli("recipes")
    assert result.returncode == 0
    for name in ("tiny-demo", "llama7b-r8", "llama2-70b-r8", "qwen2.5-7b-r16"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name + " "))
        assert "GPU" in line or "CPU" in line


def test_unknown_recipe_exits_2_with_a_suggestion():
    assert_one_line_error(run_cli("--recipe", "tiny-dem"), 2, "did you mean 'tiny-demo'")


def test_train_subcommand_is_the_default(cli):
    assert_one_line_error(cli("train", "--recipe", "tiny-dem"), 2, "unknown recipe")


def test_bad_override_exits_2(cli):
    assert_one_line_error(cli("--recipe", "tiny-demo", "--set", "lora.rank=4", "--dry-run"), 2,
                          "lora.rank: unknown key, did you mean lora.r?")


def test_dry_run_validates_without_loading_weights(tmp_path):
    result = run_cli("--recipe", "llama7b-r8", "--dry-run", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "huggyllama/llama-7b: 4-bit nf4 + double quant" in result.stdout
    assert "1 x 16 accumulation = 16 sequences/step" in result.stdout
    assert "stopping before loading weights" in result.stdout
    assert not (tmp_path / "run").exists()


def test_gpu_recipe_without_cuda_prints_the_plan_and_exits_3(tmp_path):
    result = run_cli("--recipe", "llama7b-r8", "--output-dir", str(tmp_path / "run"))
    assert "r=8 alpha=16 dropout=0.05 on all-linear" in result.stdout
    assert_one_line_error(result, 3, "no CUDA GPU is visible", "--force")
    assert not (tmp_path / "run").exists()


def test_finished_run_is_never_overwritten(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 1}))
    assert_one_line_error(cli("--recipe", "tiny-demo", "--output-dir", str(run)), 2, "already holds a finished run")
    assert json.loads((run / "summary.json").read_text()) == {"steps": 1}


def test_unfinished_run_needs_resume(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert_one_line_error(cli("--recipe", "tiny-demo", "--output-dir", str(run)), 2, "--resume")


def test_unwritable_output_dir(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(cli("--recipe", "tiny-demo", "--output-dir", str(blocker / "run")), 2,
                          "cannot write there", "choose a writable directory")


def test_missing_model_directory(cli, tmp_path):
    result = cli("--recipe", "tiny-demo", "--output-dir", str(tmp_path / "run"),
                     "--set", f"model.name_or_path={tmp_path / 'no-such-model'}")
    assert_one_line_error(result, 2, "model.name_or_path", "is not a model directory")
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion"\n', ":2: invalid JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', ":2: field 'completion' must be a string, got nothing"),
    ("", "the file has no rows"),
])
def test_bad_dataset_exits_2_naming_file_and_line(cli, tmp_path, content, fragment):
    data = tmp_path / "rows.jsonl"
    if content is not None:
        data.write_text(content)
    result = cli("--recipe", "tiny-demo", "--output-dir", str(tmp_path / "run"), "--set", f"data.path={data}",
                     "--set", "eval.exact_match=false", "--set", "data.eval_path=null")
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_resume_needs_an_output_dir():
    assert main(["--recipe", "tiny-demo", "--resume"]) == 2


def test_readme_commands_match_ci():
    """The README's test commands are what CI runs: a drift here would let CI test something else."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("pip install torch==2.13.0 -e '.[test,gguf]' && python -m pytest -q\n", "python -m pytest -q -m slow\n"):
        assert command in readme and command in ci, command


def test_a_wheel_carries_the_recipes_and_demo_data(tmp_path):
    """Installed from a wheel (not editable), `--recipe NAME` must still find the shipped recipes."""
    import subprocess
    import sys
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(tmp_path.glob("qlora_trainer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "qlora_trainer/recipes/tiny-demo.yaml" in names and "qlora_trainer/recipes/data/complaints-train.jsonl" in names
    assert "qlora_trainer/recipes/accelerate/fsdp-qlora.yaml" in names, "multi-GPU recipes name their accelerate config"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    listed = subprocess.run([sys.executable, "-c", "from qlora_trainer.config.recipe_files import shipped_recipes_dir, shipped_recipe_names;"
                             "print(shipped_recipes_dir()); print(shipped_recipe_names())"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")})
    assert listed.returncode == 0, listed.stderr
    assert str(tmp_path / "site" / "qlora_trainer" / "recipes") in listed.stdout and "tiny-demo" in listed.stdout


def test_trusting_remote_code_is_announced(cli, tmp_path):
    result = cli("--recipe", "llama7b-r8", "--dry-run", "--set", "model.trust_remote_code=true", "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 0
    assert "WARNING   model.trust_remote_code is on: Python code from huggyllama/llama-7b will run" in result.stdout
    plain = cli("--recipe", "llama7b-r8", "--dry-run", "--output-dir", str(tmp_path / "r"))
    assert "WARNING" not in plain.stdout


def test_pickle_weights_are_refused_unless_allowed(cli, tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), pickled / "pytorch_model.bin")
    result = cli("--recipe", "tiny-demo", "--output-dir", str(tmp_path / "run"), "--set", f"model.name_or_path={pickled}")
    assert result.returncode == 2 and "has no safetensors weights" in result.stderr and "allow_pickle_weights" in result.stderr
    assert not (tmp_path / "run").exists(), "a run that never started leaves no directory behind"
