"""The command line's one boundary (docs/errors.md): every exception, ours or a library's, ends as one
`qlora-trainer: error:` line; damaged files are named with exit 2; unexpected errors exit 1 with their traceback
in a log; a failed run or export leaves nothing behind. Each case checks the exit code, the one line, no
traceback, and that nothing under the watched paths was created, changed or removed (tests/helpers.py)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import fail_at_step, refused_cleanly, tiny_recipe, tree_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_trainer.cli import main
from qlora_trainer.errors import TrainingFailed


def recipe_for(tmp_path: Path, model_dir: Path) -> Path:
    return tiny_recipe(tmp_path / "recipe.yaml", model_dir)


def truncated_copy(source: Path, target: Path, name: str, cut) -> Path:
    """A copy of directory `source` whose file `name` is cut to `cut` bytes (a fraction: of its size)."""
    shutil.copytree(source, target)
    data = (target / name).read_bytes()
    size = int(len(data) * cut) if isinstance(cut, float) else cut
    (target / name).write_bytes(data[:size])
    return target


# ------------------------------------------------------------------------------------------- damaged inputs

CUTS = [0, 7, 8, 100, 0.5, 0.999]


@pytest.mark.parametrize("command", ["export", "generate"])
@pytest.mark.parametrize("cut", CUTS, ids=str)
def test_a_truncated_adapter_is_named(adapter_dir, tmp_path, command, cut):
    damaged = truncated_copy(adapter_dir, tmp_path / "adapter", "adapter_model.safetensors", cut)
    argv = [command, str(damaged)] + (["--output", str(tmp_path / "exports" / "new" / "out")] if command == "export"
                                      else ["--prompt", "hello"])
    line = refused_cleanly(argv, 2, "adapter_model.safetensors is damaged", watch=[tmp_path])
    assert str(damaged) in line and "again" in line


@pytest.mark.parametrize("command", ["export", "generate"])
@pytest.mark.parametrize("content", [None, "", "{", '{"r": 4,', "[1, 2]", '"lora"', "\xff\xfe"],
                         ids=["cut", "empty", "brace", "half", "array", "string", "not-utf8"])
def test_a_damaged_adapter_config_is_named(adapter_dir, tmp_path, command, content):
    damaged = tmp_path / "adapter"
    shutil.copytree(adapter_dir, damaged)
    config = damaged / "adapter_config.json"
    if content is None:
        config.write_bytes(config.read_bytes()[: len(config.read_bytes()) // 3])
    elif content == "\xff\xfe":
        config.write_bytes(b"\xff\xfe{}")
    else:
        config.write_text(content)
    argv = [command, str(damaged)] + (["--output", str(tmp_path / "out")] if command == "export" else ["--prompt", "x"])
    refused_cleanly(argv, 2, "adapter_config.json is damaged", watch=[tmp_path])


@pytest.mark.parametrize("fingerprinted", [False, True], ids=["plain-adapter", "fingerprinted"])
@pytest.mark.parametrize("cut", [0, 8, 0.5], ids=str)
def test_a_truncated_base_is_named_by_export_after_making_nothing(adapter_dir, tiny_model_dir, tmp_path, cut,
                                                                 fingerprinted):
    """A damaged --base is named with the fix, --base included, whether the fingerprint check reads it first (an
    adapter that records one) or the merge does, after the staging directory and the output's parents exist:
    those go again."""
    from qlora_trainer.config.recipe import ModelSection
    from qlora_trainer.loading import base_fingerprint

    if fingerprinted:
        adapter_dir = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
        value = base_fingerprint.fingerprint(ModelSection(name_or_path=str(tiny_model_dir)))
        (adapter_dir / base_fingerprint.FILE).write_text(json.dumps({"base": str(tiny_model_dir), "sha256": value}))
    base = truncated_copy(tiny_model_dir, tmp_path / "base", "model.safetensors", cut)
    argv = ["export", str(adapter_dir), "--base", str(base), "--output", str(tmp_path / "a" / "b" / "out")]
    line = refused_cleanly(argv, 2, "model.safetensors is damaged", watch=[tmp_path, adapter_dir])
    assert str(base) in line and "pass another copy with --base" in line


@pytest.mark.parametrize("cut", [0, 8, 0.5], ids=str)
def test_a_truncated_base_is_named_by_generate(adapter_dir, tiny_model_dir, tmp_path, cut):
    base = truncated_copy(tiny_model_dir, tmp_path / "base", "model.safetensors", cut)
    refused_cleanly(["generate", str(adapter_dir), "--base", str(base), "--prompt", "hi"], 2,
                    "model.safetensors is damaged", watch=[tmp_path, adapter_dir])


@pytest.mark.parametrize("cut", [0, 0.5], ids=str)
def test_a_truncated_merged_model_is_named_by_generate(tiny_model_dir, tmp_path, cut):
    merged = truncated_copy(tiny_model_dir, tmp_path / "merged", "model.safetensors", cut)
    refused_cleanly(["generate", str(merged), "--prompt", "hi"], 2, "model.safetensors is damaged", watch=[tmp_path])


@pytest.mark.parametrize("cut", [8, 0.5], ids=str)
def test_a_truncated_base_fails_a_run_that_then_leaves_nothing(tiny_model_dir, tmp_path, cut):
    """The model loads after the run directory is made (and its missing parents): a failed load removes them all,
    so the same --output-dir can be used at once."""
    base = truncated_copy(tiny_model_dir, tmp_path / "base", "model.safetensors", cut)
    recipe = recipe_for(tmp_path, base)
    refused_cleanly(["--recipe", str(recipe), "--output-dir", str(tmp_path / "runs" / "new" / "run")], 2,
                    "model.safetensors is damaged", watch=[tmp_path])


@pytest.mark.parametrize("command", ["export", "generate"])
def test_a_damaged_tokenizer_saved_with_the_adapter_is_named(adapter_dir, tmp_path, command):
    """Falling back to the base's tokenizer would silently drop the chat template training used."""
    damaged = truncated_copy(adapter_dir, tmp_path / "adapter", "tokenizer.json", 0.5)
    argv = [command, str(damaged)] + (["--output", str(tmp_path / "new" / "out"), "--no-verify"] if command == "export"
                                      else ["--prompt", "hello"])
    refused_cleanly(argv, 2, "its tokenizer (tokenizer.json, tokenizer_config.json) will not load", watch=[tmp_path])


def test_a_damaged_summary_in_a_run_is_named(adapter_dir, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    recipe_for(run, tiny_model_dir)
    (run / "summary.json").write_text('{"steps": 4, "data_fo')
    refused_cleanly(["generate", str(run), "--prompt", "hi"], 2, "summary.json is damaged", watch=[tmp_path])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 1.0, exclude_max=True), command=st.sampled_from(["export", "generate"]))
def test_any_truncation_of_the_adapter_is_refused_cleanly(adapter_dir, tmp_path_factory, fraction, command):
    tmp = tmp_path_factory.mktemp("cut")
    damaged = tmp / "adapter"
    shutil.copytree(adapter_dir, damaged)
    weights = damaged / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * fraction)])
    argv = [command, str(damaged)] + (["--output", str(tmp / "x" / "out")] if command == "export" else ["--prompt", "a"])
    refused_cleanly(argv, 2, "is damaged", watch=[tmp])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_of_the_adapter_config_is_refused_cleanly(adapter_dir, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("cut")
    damaged = tmp / "adapter"
    shutil.copytree(adapter_dir, damaged)
    config = damaged / "adapter_config.json"
    text = config.read_bytes()
    cut = data.draw(st.integers(0, text.rindex(b"}") - 1))  # every cut before the closing brace breaks the JSON
    config.write_bytes(text[:cut])
    refused_cleanly(["export", str(damaged), "--output", str(tmp / "out")], 2, "adapter_config.json is damaged",
                    watch=[tmp])


# ---------------------------------------------------------------------------------------------- export paths

def test_export_under_a_file_is_refused(adapter_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    line = refused_cleanly(["export", str(adapter_dir), "--output", str(tmp_path / "file" / "out")], 2,
                           "cannot write in", watch=[tmp_path, adapter_dir])
    assert "a part of it is a file" in line


def test_export_deep_under_a_file_is_refused(adapter_dir, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    refused_cleanly(["export", str(adapter_dir), "--output", str(tmp_path / "file" / "a" / "b" / "out")], 2,
                    "a part of it is a file", watch=[tmp_path, adapter_dir])


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, where nobody (root included) may make a directory")
def test_export_where_nobody_may_write_is_refused(adapter_dir, tmp_path):
    """Permission bits do not stop root, which runs these tests in CI containers; sysfs refuses a new directory
    to everyone, so the unwritable case is real here too."""
    target = Path("/sys") / "qlora-trainer-test" / "out"
    line = refused_cleanly(["export", str(adapter_dir), "--output", str(target)], 2, "cannot write in",
                           watch=[adapter_dir])
    assert "/sys" in line and not target.parent.exists()


def test_a_failed_forced_export_keeps_the_old_one_and_leaves_nothing(adapter_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "exports" / "out"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_text("the previous export")
    base = truncated_copy(tiny_model_dir, tmp_path / "base", "model.safetensors", 0.5)
    refused_cleanly(["export", str(adapter_dir), "--base", str(base), "--output", str(out), "--force"], 2,
                    "is damaged", watch=[tmp_path])
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_forced_export_replaces_the_old_one_and_leaves_no_hidden_copy(adapter_dir, tmp_path, capsys):
    out = tmp_path / "exports" / "out"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("the previous export")
    assert main(["export", str(adapter_dir), "--output", str(out), "--force", "--no-verify"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"], "no .out.old-* or .out.tmp-* left"
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()



def test_an_export_killed_outright_is_cleared_by_the_next_one(adapter_dir, tmp_path, capsys):
    """SIGKILL runs no cleanup: the next export of the same output removes the staging directory no writer holds,
    keeps one whose writer still holds its lock (or that is too young to be locked yet), and names a moved-aside
    previous export without deleting it."""
    import os
    import time

    from qlora_trainer.files.staging import MIN_AGE_S, held, make_staging_dir

    out = tmp_path / "exports" / "[v2] out"  # glob characters in the name must not hide its leftovers
    out.parent.mkdir(parents=True)
    long_ago = time.time() - 10 * MIN_AGE_S
    dead, live, young = make_staging_dir(out), make_staging_dir(out), make_staging_dir(out)
    (dead / "model.safetensors").write_text("half written")
    for path in (dead, live):
        os.utime(path, (long_ago, long_ago))
    aside = out.with_name(f".{out.name}.old-1a2b3c4d")
    aside.mkdir()
    with held(live):  # another writer at work
        assert main(["export", str(adapter_dir), "--output", str(out), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert not dead.exists() and f"removed {dead}" in printed
    assert live.is_dir() and young.is_dir() and str(live) not in printed
    assert aside.is_dir() and f"{aside} is a previous" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([aside.name, live.name, young.name, out.name])


# ------------------------------------------------------------------------------------------------ prompts

@pytest.mark.parametrize("prompt", ["", " ", "\n", "\t \n"], ids=["empty", "space", "newline", "blank"])
def test_an_empty_prompt_is_refused_before_loading(adapter_dir, tmp_path, prompt):
    refused_cleanly(["generate", str(adapter_dir), "--prompt", prompt], 2, "--prompt is empty", watch=[tmp_path])


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"], ids=["empty", "newlines", "blank"])
def test_a_prompt_file_without_prompts_is_refused(adapter_dir, tmp_path, content):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    refused_cleanly(["generate", str(adapter_dir), "--file", str(prompts)], 2, "holds no prompts", watch=[tmp_path])


# ------------------------------------------------------------------------------- unexpected (internal) errors

def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def boom(*args, **kwargs):
    raise RuntimeError("injected failure\nsecond line")


def saved_log(line: str) -> Path:
    found = re.search(r"the full traceback is in (\S+?);", line)
    assert found, line
    return Path(found.group(1))


INTERNAL = [  # (command, the function of ours that fails, its module)
    ("train", "load_base_model", "qlora_trainer.loading.model"),
    ("train", "build_trainer", "qlora_trainer.training.train"),
    ("export", "merge_streaming", "qlora_trainer.deploy.export"),
    ("export", "find_adapter", "qlora_trainer.deploy.export"),
    ("generate", "load_for_inference", "qlora_trainer.deploy.generate"),
    ("estimate", "estimate", "qlora_trainer.estimate.memory"),
    ("recipes", "shipped_recipe_names", "qlora_trainer.config.recipe_files"),
]


def argv_for(command: str, tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path) -> list[str]:
    return {"train": ["--recipe", str(recipe_for(tmp_path, tiny_model_dir)), "--output-dir", str(tmp_path / "out" / "run")],
            "export": ["export", str(adapter_dir), "--output", str(tmp_path / "out" / "merged")],
            "generate": ["generate", str(adapter_dir), "--prompt", "hi"],
            "estimate": ["estimate", "--model", str(tiny_model_dir)],
            "recipes": ["recipes"]}[command]


@pytest.mark.parametrize("command, name, module", INTERNAL, ids=[f"{c}-{n}" for c, n, _ in INTERNAL])
def test_an_unexpected_error_is_one_line_exit_1_with_its_traceback_saved(
        command, name, module, tmp_path, tiny_model_dir, adapter_dir, monkeypatch, private_cache):
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name, boom)
    argv = argv_for(command, tmp_path, tiny_model_dir, adapter_dir)
    line = refused_cleanly(argv, 1, "internal error: RuntimeError: injected failure;", watch=[tmp_path / "out"])
    assert "second line" not in line and "--debug" in line
    log = saved_log(line)
    assert log.is_relative_to(private_cache / "errors"), "nothing kept a run directory: the log is in the cache"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in boom" in text and name in text and "second line" in text
    assert text.startswith(f"command: qlora-trainer {' '.join(argv)}")


@pytest.mark.parametrize("command, name, module", INTERNAL[:1] + INTERNAL[2:3] + INTERNAL[5:6],
                         ids=["train", "export", "estimate"])
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_too(command, name, module, where, tmp_path, tiny_model_dir, adapter_dir,
                                        monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name, boom)
    argv = argv_for(command, tmp_path, tiny_model_dir, adapter_dir)
    if where == "before":
        argv = ["--debug", *argv]
    else:
        argv = [*argv, "--debug"]
    code, _, err = run_main(argv)
    assert code == 1 and "Traceback (most recent call last)" in err and "in boom" in err, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("qlora-trainer: error:")]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--debug", "--recipe", "no-such-recipe"], "no-such-recipe"),
    (["estimate", "--debug", "--model-size", "3.7Q"], "3.7Q"),
    (["--debug", "generate", "/no/such/run", "--prompt", "x"], "does not exist"),
])
def test_debug_with_bad_input_keeps_exit_2_and_shows_where_it_was_raised(argv, fragment):
    code, _, err = run_main(argv)
    lines = [line for line in err.splitlines() if line.startswith("qlora-trainer: error:")]
    assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" in err, err[-2000:]


def test_an_unexpected_error_after_the_first_step_keeps_the_run_and_logs_there(tmp_path, tiny_model_dir,
                                                                               monkeypatch):
    """A run that stepped has checkpoints worth resuming: it stays, with error.log beside them."""
    fail_at_step(monkeypatch, 3, RuntimeError("injected at step 3"))
    run = tmp_path / "run"
    code, _, err = run_main(["--recipe", str(recipe_for(tmp_path, tiny_model_dir)), "--output-dir", str(run)])
    lines = [line for line in err.splitlines() if line.startswith("qlora-trainer: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert saved_log(lines[0]) == run / "error.log"
    assert "injected at step 3" in (run / "error.log").read_text()
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (run / "summary.json").exists()


def test_ctrl_c_before_the_first_step_leaves_no_run_directory(tmp_path, tiny_model_dir, monkeypatch):
    import qlora_trainer.loading.model as model_lib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_lib, "load_base_model", interrupted)
    recipe = recipe_for(tmp_path, tiny_model_dir)
    before = tree_state(tmp_path)
    code, _, err = run_main(["--recipe", str(recipe), "--output-dir", str(tmp_path / "runs" / "run")])
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert tree_state(tmp_path) == before


def test_an_empty_output_dir_made_beforehand_is_emptied_not_removed(tmp_path, tiny_model_dir, monkeypatch):
    import qlora_trainer.loading.model as model_lib

    monkeypatch.setattr(model_lib, "load_base_model", boom)
    run = tmp_path / "run"
    run.mkdir()
    refused_cleanly(["--recipe", str(recipe_for(tmp_path, tiny_model_dir)), "--output-dir", str(run)], 1,
                    "internal error", watch=[tmp_path])


@pytest.mark.parametrize("error, fragment", [
    (PermissionError(13, "Permission denied", "/data/secret.jsonl"), "/data/secret.jsonl: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "/data/dir"), "/data/dir: Is a directory"),
    (NotADirectoryError(20, "Not a directory", "/data/file/x"), "a part of the path is a file"),
])
def test_an_os_error_on_a_named_path_is_bad_input(error, fragment, monkeypatch, tmp_path):
    import qlora_trainer.config.recipe_files as recipe_module

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(recipe_module, "shipped_recipe_names", fail)
    refused_cleanly(["recipes"], 2, fragment, watch=[tmp_path])


def test_a_closed_pipe_ends_quietly(monkeypatch):
    import qlora_trainer.config.recipe_files as recipe_module

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(recipe_module, "shipped_recipe_names", closed)
    code, _, err = run_main(["recipes"])
    assert code == 1 and err == ""


# ------------------------------------------------------------------- an unexpected error in two processes

def _worker(rank: int, world: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    from qlora_trainer import distributed
    from qlora_trainer.errors import InternalError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    launch = distributed.current_launch()
    outcome = {}
    try:
        with distributed.together(launch):
            if rank == 1:
                raise ValueError("a library failed in one process")
    except InternalError as err:
        outcome["together"] = (str(err), getattr(err, "agreed", False), "Traceback" in err.details)
    try:
        distributed.on_main(lambda: {}["missing"], launch)
    except InternalError as err:
        outcome["on_main"] = str(err)
    results[rank] = outcome
    dist.destroy_process_group()


def test_an_unexpected_error_in_one_process_ends_every_process_with_it():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["together"] == ("process 1: ValueError: a library failed in one process", True, True)
        assert results[rank]["on_main"] == "KeyError: 'missing'"


@given(st.text(max_size=20))
def test_a_user_error_is_one_line_whatever_it_quotes(quoted):
    """Keys, values and file names come from the user: a line break or an escape sequence in one must not split the
    error line or rewrite the terminal."""
    from qlora_trainer.errors import UserError

    message = str(UserError(f"data.path: {quoted} does not exist"))
    assert message.splitlines() == [message] and "\x1b" not in message
    assert message.startswith("data.path: ") and message.endswith(" does not exist")


def test_a_path_with_a_line_break_is_quoted_on_the_one_line(tmp_path, tiny_model_dir):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, data={"path": "rows\nx\x1b.jsonl"})
    line = refused_cleanly(["--recipe", str(recipe), "--output-dir", str(tmp_path / "run")], 2, "rows\\nx\\x1b.jsonl",
                           watch=[tmp_path])
    assert "data.path" in line


@pytest.mark.parametrize("error", [TrainingFailed, RuntimeError], ids=["ours", "internal"])
def test_the_reported_line_escapes_what_it_quotes_whatever_the_error(tmp_path, tiny_model_dir, monkeypatch, error):
    """Not only UserError: a failed run's or an internal error's line may quote a path or a library's message."""
    import qlora_trainer.loading.model as model_lib

    def fails(*args, **kwargs):
        raise error("cannot read /data/x\x1b[2J.bin")

    monkeypatch.setattr(model_lib, "load_base_model", fails)
    recipe = recipe_for(tmp_path, tiny_model_dir)
    refused_cleanly(["--recipe", str(recipe), "--output-dir", str(tmp_path / "runs" / "run")], 1,
                    "cannot read /data/x\\x1b[2J.bin", watch=[tmp_path / "runs"])
