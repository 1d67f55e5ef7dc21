"""Issue 15, part B: a corpus of bad and awkward inputs across recipes, --set, datasets, model directories,
export, generate, estimate and --resume. Each case asserts exit 2, exactly one `qlora-trainer: error:` line naming
the cause, no traceback, and nothing under the watched paths created, changed or removed (helpers.refused_cleanly).
Almost every case is refused before any weights load; the few that need a trained adapter share `demo_run`.
Then the behaviour that changed for good input: BOM files, --set SECTION={...}, file modes under the umask.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from helpers import refused_cleanly
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_trainer.cli import main
from qlora_trainer.config.recipe_files import load_recipe, load_yaml, validate
from qlora_trainer.dataset.data import load_data
from qlora_trainer.errors import UserError

ROWS = [{"prompt": f"Tweet: my bill {i} is late\nLabel:", "completion": " complaint"} for i in range(8)]
TINY_LINEARS = "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class Workspace:
    """A data file, the tiny model and a recipe for them, in the test's directory; `run` is never created."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.data = root / "rows.jsonl"
        self.data.write_text(jsonl(ROWS), encoding="utf-8")
        self.run = root / "run"

    def recipe(self, text: str | None = None, name: str = "recipe.yaml", **sections) -> Path:
        """A recipe file: the given text, or the tiny recipe with `sections` merged over it."""
        if text is None:
            raw = {"model": {"name_or_path": str(self.model)}, "data": {"path": str(self.data)},
                   "train": {"seq_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
                             "device": "cpu"}}
            for section, values in sections.items():
                raw.setdefault(section, {}).update(values)
            text = yaml.safe_dump(raw)
        path = self.root / name
        path.write_text(text, encoding="utf-8")
        return path

    def train(self, recipe: Path, *extra: str) -> list[str]:
        return ["--recipe", str(recipe), "--output-dir", str(self.run), *extra]

    def watch(self, *more: Path) -> list[Path]:
        return [self.run, self.data, self.model, *more]


@pytest.fixture
def ws(tmp_path, tiny_model_dir) -> Workspace:
    return Workspace(tmp_path, tiny_model_dir)


# ================================================================ recipes (YAML files)

DUPLICATES = {
    "section-twice": "model: {name_or_path: M}\ndata: {path: D}\ntrain: {seq_len: 64}\ntrain: {max_steps: 2}\n",
    "key-twice-in-block": "model:\n  name_or_path: M\ndata:\n  path: D\ntrain:\n  seq_len: 64\n  seq_len: 32\n",
    "key-twice-in-flow": "model: {name_or_path: M}\ndata: {path: D, path: E}\n",
    "nested-columns-twice": "model: {name_or_path: M}\ndata:\n  path: D\n  columns:\n    prompt: q\n    prompt: a\n",
    "model-twice": "model: {name_or_path: M}\nmodel: {name_or_path: M}\ndata: {path: D}\n",
    "lora-key-twice": "model: {name_or_path: M}\ndata: {path: D}\nlora:\n  r: 8\n  alpha: 16\n  r: 16\n",
    "description-twice": "description: a\ndescription: b\nmodel: {name_or_path: M}\ndata: {path: D}\n",
}


@pytest.mark.parametrize("text", DUPLICATES.values(), ids=DUPLICATES.keys())
def test_duplicate_yaml_keys_are_refused_with_both_lines(ws, text):
    path = ws.recipe(text.replace("M", str(ws.model)).replace("D", str(ws.data)))
    line = refused_cleanly(ws.train(path), 2, "given twice", ws.watch(path))
    assert "line" in line and "first on line" in line


BAD_RECIPES = [  # (sections merged over the tiny recipe, fragment of the one error line)
    ({"train": {"seed": -1}}, "train.seed"),
    ({"train": {"seed": 2**32}}, "train.seed"),
    ({"train": {"seed": "abc"}}, "train.seed"),
    ({"data": {"path": ""}}, "data.path"),
    ({"data": {"path": "   "}}, "is empty"),
    ({"data": {"eval_path": ""}}, "data.eval_path"),
    ({"model": {"name_or_path": ""}}, "model.name_or_path"),
    ({"train": {"gpu_memory_gib": -4}}, "train.gpu_memory_gib"),
    ({"train": {"gpu_memory_gib": 0}}, "train.gpu_memory_gib"),
    ({"train": {"gpu_memory_gib": float("nan")}}, "finite"),
    ({"train": {"gpu_memory_gib": float("inf")}}, "finite"),
    ({"train": {"gpu_memory_gib": float("-inf")}}, "train.gpu_memory_gib"),
    ({"lora": {"target_modules": []}}, "lora.target_modules is empty; list some of"),
    ({"lora": {"target_modules": ["qkv_proj"]}}, "qkv_proj is not a linear layer"),
    ({"lora": {"target_modules": ["q_proj", "nope"]}}, "nope is not a linear layer"),
    ({"lora": {"target_modules": ["Q_PROJ"]}}, "Q_PROJ is not a linear layer"),
    ({"lora": {"target_modules": ["layers.0.self_attn.q"]}}, TINY_LINEARS),
    ({"train": {"seq_len": 10**29}}, "exceeds the 256 positions"),
    ({"train": {"seq_len": 257}}, "train.seq_len 257 exceeds the 256 positions"),
    ({"train": {"seq_len": 4096}}, "max_position_embeddings"),
]


@pytest.mark.parametrize("sections,fragment", BAD_RECIPES, ids=[f"{s}"[:60] for s, _ in BAD_RECIPES])
def test_bad_recipe_values(ws, sections, fragment):
    path = ws.recipe(**sections)
    refused_cleanly(ws.train(path), 2, fragment, ws.watch(path))


def test_bad_recipe_values_are_also_refused_by_dry_run_and_estimate(ws):
    path = ws.recipe(lora={"target_modules": ["qkv_proj"]})
    refused_cleanly(ws.train(path, "--dry-run"), 2, TINY_LINEARS, ws.watch(path))
    refused_cleanly(["estimate", "--recipe", str(path)], 2, TINY_LINEARS, ws.watch(path))
    long = ws.recipe(name="long.yaml", train={"seq_len": 300})
    refused_cleanly(["estimate", "--recipe", str(long)], 2, "exceeds the 256 positions", ws.watch(long))


def test_a_directory_given_as_the_recipe_is_named_as_one(ws):
    (ws.root / "recipes.yaml").mkdir()
    refused_cleanly(ws.train(ws.root / "recipes.yaml"), 2, "is a directory, not a YAML file", ws.watch())
    refused_cleanly(ws.train(ws.root), 2, "is a directory", ws.watch())


# ================================================================ --set

BAD_SETS = [
    ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("train.seed=1.5", "train.seed"),
    ("data.path=", "data.path"),
    ("data.path=''", "data.path"),
    ("data.eval_path=' '", "data.eval_path"),
    ("model.name_or_path=", "model.name_or_path"),
    ("train.gpu_memory_gib=-4", "train.gpu_memory_gib"),
    ("train.gpu_memory_gib=.nan", "finite"),
    ("train.gpu_memory_gib=nan", "finite"),
    ("train.gpu_memory_gib=.inf", "finite"),
    ("train.gpu_memory_gib=inf", "finite"),
    ("train.gpu_memory_gib=0", "train.gpu_memory_gib"),
    ("lora.target_modules=[]", "lora.target_modules is empty"),
    ("lora.target_modules=[qkv_proj]", "qkv_proj is not a linear layer"),
    ("lora.target_modules=[q_proj, k_proj, wq]", "wq is not a linear layer"),
    ("train.seq_len=1.0e+29", "train.seq_len"),
    ("train.seq_len=100000", "exceeds the 256 positions"),
    ("train={seed: -1}", "train.seed"),
    ("train={seq_len: 64, seq_len: 32}", "given twice"),
    ("lora={target_modules: [x_proj]}", "x_proj is not a linear layer"),
    ("data={path: ''}", "data.path"),
    ("train={gpu_memory_gib: .nan}", "finite"),
]


@pytest.mark.parametrize("override,fragment", BAD_SETS, ids=[o for o, _ in BAD_SETS])
def test_bad_overrides(ws, override, fragment):
    path = ws.recipe()
    refused_cleanly(ws.train(path, "--set", override), 2, fragment, ws.watch(path))


@pytest.mark.parametrize("value", ["-4", "nan", "inf", "-inf", "0", "-0.0", "NaN"])
@pytest.mark.parametrize("command", ["train", "estimate"])
def test_gpu_memory_flag_must_be_finite_and_positive(ws, command, value):
    path = ws.recipe()
    argv = ws.train(path) if command == "train" else ["estimate", "--recipe", str(path)]
    refused_cleanly([*argv, f"--gpu-memory={value}"], 2, "--gpu-memory must be a positive number", ws.watch(path))


def test_set_section_merges_into_the_section(write_recipe, tmp_path):
    """`--set 'train={...}'` changes the keys it names and keeps the rest, exactly as dotted keys would."""
    path = write_recipe("model: {name_or_path: m}\ndata: {path: d}\n"
                        "train: {seq_len: 128, max_steps: 7, learning_rate: 0.001, seed: 3}\n")
    merged, _ = load_recipe(str(path), ["train={seq_len: 64, seed: 5}"])
    dotted, _ = load_recipe(str(path), ["train.seq_len=64", "train.seed=5"])
    assert merged == dotted
    assert (merged.train.seq_len, merged.train.max_steps, merged.train.learning_rate, merged.train.seed) == (64, 7, 0.001, 5)
    nested, _ = load_recipe(str(path), ["data={columns: {prompt: q}}"])
    assert nested.data.path == "d" and nested.data.columns == {"prompt": "q"}


SECTION_VALUES = {
    "seq_len": st.integers(1, 256), "max_steps": st.integers(1, 50), "seed": st.integers(0, 2**32 - 1),
    "learning_rate": st.floats(1e-6, 1.0), "logging_steps": st.integers(1, 100), "save_steps": st.integers(1, 100),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(SECTION_VALUES)), st.just(None), min_size=1).flatmap(
    lambda keys: st.fixed_dictionaries({k: SECTION_VALUES[k] for k in keys})))
def test_property_set_section_equals_dotted_keys(write_recipe, changes):
    path = write_recipe("model: {name_or_path: m}\ndata: {path: d}\ntrain: {seq_len: 100, max_steps: 9, seed: 1}\n")
    section = "train={" + ", ".join(f"{k}: {v!r}" for k, v in changes.items()) + "}"
    merged, _ = load_recipe(str(path), [section])
    dotted, _ = load_recipe(str(path), [f"train.{k}={v!r}" for k, v in changes.items()])
    assert merged == dotted
    for key in {"seq_len", "max_steps", "seed"} - set(changes):
        assert getattr(merged.train, key) == {"seq_len": 100, "max_steps": 9, "seed": 1}[key]


# ================================================================ datasets

BAD_DATA = [  # (file name, bytes, fragment)
    ("rows.jsonl", json.dumps(ROWS).encode(), "holds a JSON array"),
    ("rows.jsonl", json.dumps(ROWS, indent=2).encode(), "rename it to .json"),
    ("rows.jsonl", b"\xef\xbb\xbf" + json.dumps(ROWS).encode(), "holds a JSON array"),
    ("rows.jsonl", b"[1, 2]\n[3]\n", "JSON array"),
    ("rows.jsonl", b"1\n2\n3\n", "expected a JSON object per line, got int"),
    ("rows.jsonl", b'"a"\n"b"\n', "got str"),
    ("rows.jsonl", b"null\n", "got NoneType"),
    ("rows.jsonl", b"{}\n{}\n", "the row is an empty object"),
    ("rows.json", b"[1, 2, 3]", "expected a JSON object, got int"),
    ("rows.json", b'["a", "b"]', "got str"),
    ("rows.jsonl", jsonl([{"text": ""}] * 4).encode(), "no train row has a token to learn from"),
    ("rows.jsonl", jsonl([{"prompt": "", "completion": ""}] * 4).encode(), "no train row has a token to learn from"),
    ("rows.csv", b"text\n\"\"\n\"\"\n", "rows.csv row 1: field 'text' must be a string"),
    ("rows.csv", b"prompt,completion\na,b\nx,y,z,w\n", "Expected 2 fields in line 3"),
    ("rows.csv", b'prompt,completion\n"a,b\n', "EOF inside string"),
    ("rows.jsonl", b"\xef\xbb\xbf{\"prompt\": \"a\"}\n", "completion"),
]


@pytest.mark.parametrize("name,content,fragment", BAD_DATA, ids=[f"{n}:{c[:24]!r}" for n, c, _ in BAD_DATA])
def test_bad_datasets(ws, name, content, fragment):
    data = ws.root / "data" / name
    data.parent.mkdir()
    data.write_bytes(content)
    path = ws.recipe(data={"path": str(data), "format": "auto"})
    refused_cleanly(ws.train(path), 2, fragment, ws.watch(path, data))


def test_bad_rows_with_explicit_format_name_the_row_not_the_columns(ws):
    data = ws.root / "arr.jsonl"
    data.write_text("1\n2\n", encoding="utf-8")
    path = ws.recipe(data={"path": str(data), "format": "prompt_completion"})
    line = refused_cleanly(ws.train(path), 2, "arr.jsonl:1", ws.watch(path, data))
    assert "columns are none" not in line


@pytest.mark.parametrize("nested", ["part.json", "part-0.jsonl", "x.csv", "y.parquet"])
def test_a_directory_inside_the_data_directory_is_named(ws, nested):
    folder = ws.root / "folder"
    (folder / nested).mkdir(parents=True)
    (folder / "a.jsonl").write_text(jsonl(ROWS), encoding="utf-8")
    path = ws.recipe(data={"path": str(folder)})
    refused_cleanly(ws.train(path), 2, f"{nested} is a directory, not a data file", ws.watch(path, folder))


def test_an_empty_eval_split_is_refused(ws):
    evals = ws.root / "eval.jsonl"
    evals.write_text(jsonl([{"prompt": "", "completion": ""}] * 2), encoding="utf-8")
    path = ws.recipe(data={"eval_path": str(evals)})
    refused_cleanly(ws.train(path), 2, "no eval row has a token", ws.watch(path, evals))


def test_a_bom_is_read_past_in_jsonl_json_and_csv(tiny_model_dir, tmp_path):
    """Accepting a UTF-8 BOM in every text format: the same rows with and without one."""
    bom = b"\xef\xbb\xbf"
    files = {".jsonl": jsonl(ROWS).encode(), ".json": json.dumps(ROWS).encode(),
             ".csv": ("prompt,completion\n" + "".join(f'"{r["prompt"]}",{r["completion"]}\n' for r in ROWS)).encode()}
    for suffix, content in files.items():
        loaded = []
        for prefix in (b"", bom):
            path = tmp_path / f"rows-{len(prefix)}{suffix}"
            path.write_bytes(prefix + content)
            section = validate({"model": {"name_or_path": "m"}, "data": {"path": str(path)}}, "t").data
            data = load_data(section, seed=0)
            loaded.append((data.format, data.train.column_names, data.train.to_list()))
        assert loaded[0] == loaded[1], suffix
        assert loaded[0][1] == ["prompt", "completion"] and loaded[0][2][0]["completion"] == " complaint"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20), "completion": st.text(max_size=10)}),
                min_size=1, max_size=6), st.booleans())
def test_property_bom_never_changes_the_rows(tmp_path, rows, bom):
    path = tmp_path / "rows.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + jsonl(rows).encode())
    section = validate({"model": {"name_or_path": "m"}, "data": {"path": str(path)}}, "t").data
    assert load_data(section, seed=0).train.to_list() == rows


# ================================================================ model directories


def model_dir(root: Path, name: str, config: dict | None = None, raw: str | None = None, copy_from: Path | None = None,
              drop: tuple = ()) -> Path:
    """A model directory: a copy of `copy_from` (less `drop`), with config.json replaced by `raw` or merged with `config`."""
    path = root / name
    if copy_from is not None:
        shutil.copytree(copy_from, path, ignore=shutil.ignore_patterns(*drop))
    else:
        path.mkdir()
    if raw is not None:
        (path / "config.json").write_text(raw, encoding="utf-8")
    elif config is not None:
        base = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        (path / "config.json").write_text(json.dumps({**base, **config}), encoding="utf-8")
    return path


def bert(**extra) -> dict:
    return {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 320, **extra}


MODEL_CASES = {  # name -> (model_dir kwargs, fragment)
    "truncated-config": (dict(raw='{"model_type": "llama", "hidden_size": '), "not valid JSON"),
    "config-is-a-list": (dict(raw="[1, 2]"), "has no model_type"),
    "config-no-model-type": (dict(raw='{"hidden_size": 64}'), "has no model_type"),
    "config-empty-file": (dict(raw=""), "not valid JSON"),
    "unknown-model-type": (dict(raw='{"model_type": "zzz-not-a-model"}'), "model_type 'zzz-not-a-model'"),
    "remote-code-model-type": (dict(raw='{"model_type": "mine", "auto_map": {"AutoConfig": "m.C"}}'), "trust_remote_code"),
    "bert-encoder": (dict(config=bert()), "is an encoder model"),
    "roberta-encoder": (dict(config={**bert(), "model_type": "roberta"}), "is an encoder model"),
    "t5-encoder-decoder": (dict(config={"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2,
                                        "d_ff": 64, "d_kv": 16, "vocab_size": 320}), "encoder-decoder"),
    "bart-encoder-decoder": (dict(config={"model_type": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                                          "vocab_size": 320}), "encoder-decoder"),
    "vit-no-causal-head": (dict(config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 64}), "no causal-LM head"),
}


@pytest.mark.parametrize("surface", ["train", "estimate-recipe", "estimate-model"])
@pytest.mark.parametrize("case", MODEL_CASES, ids=MODEL_CASES)
def test_bad_model_directories(ws, case, surface):
    kwargs, fragment = MODEL_CASES[case]
    model = model_dir(ws.root, case, **kwargs)
    path = ws.recipe(model={"name_or_path": str(model)})
    argv = {"train": ws.train(path), "estimate-recipe": ["estimate", "--recipe", str(path)],
            "estimate-model": ["estimate", "--model", str(model)]}[surface]
    refused_cleanly(argv, 2, fragment, ws.watch(path, model))


def test_a_bert_configured_as_a_decoder_is_accepted(ws, capsys):
    """The rule reads transformers' is_decoder fact, not the model's name: BERT with is_decoder is a causal LM."""
    model = model_dir(ws.root, "bert-decoder", config=bert(is_decoder=True))
    assert main(["estimate", "--model", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] > 0


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(ws):
    model = model_dir(ws.root, "small-vocab", copy_from=ws.model, config={"vocab_size": 100})
    path = ws.recipe(model={"name_or_path": str(model)})
    refused_cleanly(ws.train(path), 2, "320 tokens but its config.json vocab_size is 100", ws.watch(path, model))


def test_fewer_positions_than_seq_len_are_refused(ws):
    model = model_dir(ws.root, "short", copy_from=ws.model, config={"max_position_embeddings": 32})
    path = ws.recipe(model={"name_or_path": str(model)})
    refused_cleanly(ws.train(path), 2, "train.seq_len 64 exceeds the 32 positions", ws.watch(path, model))
    refused_cleanly(["estimate", "--model", str(model), "--seq-len", "33"], 2, "--seq-len 33 exceeds", ws.watch(model))


@pytest.mark.parametrize("drop", [("*.safetensors",), ("*.safetensors", "generation_config.json")])
def test_a_directory_without_weights_says_so(ws, drop):
    model = model_dir(ws.root, "no-weights", copy_from=ws.model, drop=drop)
    path = ws.recipe(model={"name_or_path": str(model)})
    line = refused_cleanly(ws.train(path), 2, "has no weight files", ws.watch(path, model))
    assert "allow_pickle_weights" not in line


# ================================================================ export, generate and resume on the demo run


@pytest.fixture(scope="module")
def other_base(demo_run, tmp_path_factory) -> Path:
    """The demo base model with the same shapes and other weights (as another fine-tune of it would be)."""
    import torch
    from safetensors.torch import load_file, save_file

    from qlora_trainer.loading.demo_model import demo_model_path

    source = demo_model_path("demo:tiny-llama")
    target = tmp_path_factory.mktemp("bases") / "other"
    shutil.copytree(source, target)
    tensors = load_file(str(target / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=generator)).to(v.dtype) for k, v in tensors.items()},
              str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_the_demo_run_records_its_base_fingerprint(demo_run):
    from qlora_trainer.config.recipe import ModelSection
    from qlora_trainer.loading.base_fingerprint import FILE, fingerprint

    recorded = json.loads((demo_run / "adapter" / FILE).read_text())
    assert recorded == json.loads((demo_run / FILE).read_text())
    assert recorded["sha256"] == fingerprint(ModelSection(name_or_path="demo:tiny-llama"))


def test_fingerprint_ignores_dtype_and_sharding_and_sees_other_weights(demo_run, other_base, tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_trainer.config.recipe import ModelSection
    from qlora_trainer.loading.base_fingerprint import fingerprint
    from qlora_trainer.loading.demo_model import demo_model_path

    model = AutoModelForCausalLM.from_pretrained(demo_model_path("demo:tiny-llama"), dtype="float32")
    model.save_pretrained(tmp_path / "fp32-sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "fp32-sharded").glob("*.safetensors"))) > 1
    same = [fingerprint(ModelSection(name_or_path=p)) for p in ("demo:tiny-llama", str(tmp_path / "fp32-sharded"))]
    assert same[0] == same[1]
    assert fingerprint(ModelSection(name_or_path=str(other_base))) != same[0]


def export_cases(run: Path, root: Path) -> list[tuple[list[str], str]]:
    adapter = run / "adapter"
    (root / "a-file").write_text("x")
    return [
        (["export", str(run), "--output", str(adapter), "--force"], "inside the run"),
        (["export", str(run), "--output", str(adapter)], "already exists"),
        (["export", str(run), "--output", str(run / "merged")], "inside the run"),
        (["export", str(run), "--output", str(run / "checkpoints" / "x"), "--force"], "inside the run"),
        (["export", str(run), "--output", str(run), "--force"], "inside the run"),
        (["export", str(run), "--output", str(run.parent), "--force"], "inside the run"),
        (["export", str(adapter), "--output", str(run / "merged")], "inside the run"),
        (["export", str(adapter), "--output", str(adapter / "merged")], "inside the run"),
        (["export", str(run), "--output", str(root / "a-file"), "--force"], "is a file, not a directory"),
        (["export", str(root / "a-file"), "--output", str(root / "out")], "is a file, not a directory"),
        (["export", str(run / "summary.json"), "--output", str(root / "out")], "is a file, not a directory"),
        (["generate", str(root / "a-file"), "--prompt", "hi"], "is a file, not a directory"),
        (["generate", str(run), "--file", str(root)], "is a directory, not a text file"),
    ]


def test_export_and_generate_refuse_paths_of_the_wrong_kind(demo_run, tmp_path):
    for argv, fragment in export_cases(demo_run, tmp_path):
        refused_cleanly(argv, 2, fragment, [demo_run, tmp_path / "out", tmp_path / "a-file"])


def test_only_a_runs_own_adapter_makes_the_whole_run_the_source(tmp_path):
    from qlora_trainer.deploy.export import ExportOptions, _check_output_apart

    project = tmp_path / "project"
    (project / "my-adapter").mkdir(parents=True)
    (project / "recipe.yaml").write_text("")  # a user's own recipe beside an adapter: not a run
    _check_output_apart(ExportOptions(source=project / "my-adapter", output=project / "merged"))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("")
    with pytest.raises(UserError, match="inside the run"):
        _check_output_apart(ExportOptions(source=run / "adapter", output=run / "merged"))


@pytest.mark.parametrize("command", ["export", "generate"])
@pytest.mark.parametrize("source", ["run", "adapter"])
def test_a_base_with_other_weights_is_refused_naming_both(demo_run, other_base, tmp_path, command, source):
    path = demo_run if source == "run" else demo_run / "adapter"
    extra = ["--output", str(tmp_path / "out")] if command == "export" else ["--prompt", "hi"]
    line = refused_cleanly([command, str(path), "--base", str(other_base), *extra], 2, "has other weights",
                           [demo_run, other_base, tmp_path / "out"])
    assert "demo:tiny-llama" in line and str(other_base) in line


def test_an_adapter_set_refuses_a_base_with_other_weights(demo_run, other_base):
    from qlora_trainer.deploy.adapters import AdapterSet

    models = AdapterSet(str(other_base), device="cpu")
    with pytest.raises(UserError, match="has other weights"):
        models.add("demo", demo_run)
    assert models.names == []


def test_resume_with_a_base_of_other_weights_is_refused(ws, demo_run, other_base):
    """A resumed run must continue on the weights it started on."""
    ws.run.mkdir()
    for name in ("base_fingerprint.json", "estimate.json"):
        shutil.copy(demo_run / name, ws.run / name)
    path = ws.recipe(model={"name_or_path": str(other_base)})
    shutil.copy(path, ws.run / "recipe.yaml")
    refused_cleanly(ws.train(path, "--resume"), 2, "has other weights", [ws.run, other_base, path])
    (ws.run / "base_fingerprint.json").write_text("{not json")
    refused_cleanly(ws.train(path, "--resume"), 2, "base_fingerprint.json is damaged", [ws.run, other_base, path])


def test_an_adapter_from_before_fingerprints_is_accepted_with_a_note(demo_run, tmp_path, capsys):
    adapter = tmp_path / "old-adapter"
    shutil.copytree(demo_run / "adapter", adapter, ignore=shutil.ignore_patterns("base_fingerprint.json"))
    code = main(["generate", str(adapter), "--base", "demo:tiny-llama", "--prompt", "Tweet: hi\nLabel:",
                 "--max-new-tokens", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "records no fingerprint of its base's weights" in out


# ================================================================ estimate


ESTIMATE_CASES = [
    (["--model-size", "7B", "--seq-len", "100000000"], "--seq-len 100000000 exceeds"),
    (["--model", "llama-2-7b", "--seq-len", "8192"], "exceeds the 4096 positions"),
    (["--recipe", "tiny-demo", "--set", "train.seq_len=100000"], "train.seq_len 100000 exceeds"),
    (["--recipe", "tiny-demo", "--set", "lora.target_modules=[c_attn]"], "c_attn is not a linear layer"),
    (["--recipe", "tiny-demo", "--set", "lora.target_modules=[]"], "lora.target_modules is empty"),
    (["--recipe", "tiny-demo", "--set", "train.seed=-1"], "train.seed"),
    (["--recipe", "tiny-demo", "--set", "data.path="], "data.path"),
    (["--recipe", "tiny-demo", "--set", "train={a: 1, a: 2}"], "given twice"),
]


@pytest.mark.parametrize("args,fragment", ESTIMATE_CASES, ids=[" ".join(a)[:50] for a, _ in ESTIMATE_CASES])
def test_bad_estimates(args, fragment, tmp_path):
    refused_cleanly(["estimate", *args], 2, fragment, [tmp_path])


# ================================================================ property-based: duplicates, targets, GPU memory

KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(KEY, st.one_of(st.integers(), KEY, st.dictionaries(KEY, st.integers(), max_size=3)),
                       min_size=1, max_size=5), st.data())
def test_property_any_duplicated_key_is_refused(mapping, data):
    """Whatever the mapping, repeating one of its keys (at the top or inside a section) never loads silently."""
    text = yaml.safe_dump(mapping, default_flow_style=False)
    lines = text.splitlines()
    line = data.draw(st.sampled_from([l for l in lines if not l.startswith("- ") and ":" in l]))
    repeated = "\n".join(lines + [line]) if not line.startswith(" ") else None
    if repeated is None:  # a nested key: repeat it right after itself, inside its section
        at = lines.index(line)
        repeated = "\n".join(lines[:at + 1] + [line] + lines[at + 1:])
    with pytest.raises(yaml.YAMLError, match="given twice"):
        load_yaml(repeated)
    assert load_yaml(text) == mapping


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(TINY_LINEARS.split(", ") + ["self_attn.q_proj", "mlp", "layers", "0"]),
                          st.text(max_size=10)), max_size=4))
def test_property_targets_are_linear_layers_or_refused_with_the_list(tiny_model_dir, targets):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from qlora_trainer.estimate.shape_lookup import shape_for_model
    from qlora_trainer.loading.model_checks import check_lora_targets

    shape = shape_for_model(str(tiny_model_dir))
    # PEFT's own matcher is the oracle: a target is valid when PEFT would wrap some linear layer for it.
    valid = bool(targets) and all(any(check_target_module_exists(LoraConfig(target_modules=[t]), l.name)
                                      for l in shape.linears) for t in targets)
    try:
        check_lora_targets(targets, shape)
    except UserError as err:
        assert not valid and "\n" not in str(err) and TINY_LINEARS in str(err)
    else:
        assert valid


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10)))
def test_property_gpu_memory_is_accepted_only_when_finite_and_positive(value):
    good = math.isfinite(value) and value > 0
    try:
        validate({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "train": {"gpu_memory_gib": value}}, "t")
    except UserError as err:
        assert not good and "train.gpu_memory_gib" in str(err)
    else:
        assert good


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(-2**40, 2**40), st.text(max_size=6)))
def test_property_seed_is_accepted_only_in_numpys_range(value):
    good = isinstance(value, int) and 0 <= value < 2**32
    try:
        validate({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "train": {"seed": value}}, "t")
    except UserError as err:
        assert not good and "train.seed" in str(err)
    else:
        assert good or (isinstance(value, str) and value.strip().isdigit() and int(value) < 2**32)


# ================================================================ file modes follow the umask


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_atomic_writes_and_saved_weights_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    import torch
    from safetensors.torch import save_file

    from qlora_trainer.files.run_dir import apply_umask, write_json_atomic

    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
        (tmp_path / "adapter").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
        apply_umask(tmp_path / "adapter")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == file_mode
    assert modes(tmp_path / "adapter") == {".": dir_mode, "adapter_model.safetensors": file_mode}


def test_the_demo_run_is_readable_under_umask_022(demo_run):
    """The demo run was written by a child process under this umask (022 in CI): no 0600/0700 anywhere."""
    umask = os.umask(0o022)
    os.umask(umask)
    found = modes(demo_run)
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    for name in ("recipe.yaml", "estimate.json", "summary.json", "metrics.jsonl", "base_fingerprint.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/base_fingerprint.json"):
        assert found[name] == expected_file, (name, oct(found[name]))
    assert found["."] == found["adapter"] == expected_dir
    assert all(mode in (expected_file, expected_dir) for mode in found.values()), {k: oct(v) for k, v in found.items()}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_an_export_follows_the_umask(demo_run, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert main(["export", str(demo_run), "--output", str(tmp_path / "merged"), "--no-verify"]) == 0
    finally:
        os.umask(old)
    found = modes(tmp_path / "merged")
    assert found["."] == 0o777 & ~umask
    assert found["model.safetensors"] == found["config.json"] == found["README.md"] == 0o666 & ~umask
    assert set(found.values()) == {0o777 & ~umask, 0o666 & ~umask}


# ================================================================ issue 24: silent outcomes, races, OS limits, tools
# Each class is fixed at its root: a path from any flag or key is checked where it enters (blank, too long, a
# symlink loop), an OS error met later names the flag its path came from, data.columns must name real columns,
# --resume only continues a run, saved files are read by the one-line readers, the final move of an export never
# replaces an output that appeared meanwhile, a run holds its directory, and the tools share the CLI's boundary.

LONG = "n" * 300  # longer than any file system's name limit (255)


def path_cases(ws) -> list[tuple[list[str], str]]:
    """(command line, the flag its one line must name): every path flag, blank, too long and a symlink loop."""
    loop = ws.root / "loop"
    loop.symlink_to(loop)
    recipe = str(ws.recipe())
    cases = []
    for value in ("", " ", LONG, f"{ws.root}/{LONG}/x", str(loop), f"{loop}/x"):
        cases += [
            (["--recipe", recipe, "--output-dir", value], "--output-dir"),
            (["--recipe", recipe, "--output-dir", value, "--resume"], "--output-dir"),
            (["export", str(ws.model), "--output", value], "--output"),
            (["export", value, "--output", str(ws.root / "out")], "SOURCE"),
            (["generate", value, "--prompt", "hi"], "SOURCE"),
            (["generate", str(ws.model), "--file", value], "--file"),
            (["export", str(ws.model), "--output", str(ws.root / "out"), "--base", value], "--base"),
            (["estimate", "--model", value], "--model"),
            (["--recipe", value], "--recipe"),
        ]
    return cases


def test_every_path_flag_is_refused_blank_too_long_or_looping_naming_the_flag(ws, monkeypatch):
    """No path flag is ever read as the current directory, or reaches a library with a bare errno."""
    monkeypatch.chdir(ws.root)
    (ws.root / "recipe.yaml").write_text("the user's own file\n")  # what `--output-dir "" --resume` overwrote
    for argv, flag in path_cases(ws):
        refused_cleanly(argv, 2, flag, ws.watch(ws.root / "recipe.yaml", ws.root / "out"))


@pytest.mark.parametrize("value,reason", [("", "is empty (an unset shell variable?)"), ("  ", "is empty"),
                                          (LONG, "File name too long; a name in it is longer"),
                                          ("loop", "Too many levels of symbolic links; it goes round a loop")])
def test_the_line_says_why_a_path_flag_is_refused_and_what_to_do(ws, monkeypatch, value, reason):
    monkeypatch.chdir(ws.root)
    (ws.root / "loop").symlink_to(ws.root / "loop")
    line = refused_cleanly(ws.train(ws.recipe(), "--output-dir", value), 2, reason, ws.watch())
    assert "--output-dir" in line


PATH_KEYS = [  # (sections merged over the tiny recipe, fragment)
    ({"data": {"path": LONG + ".jsonl"}}, "data.path"),
    ({"data": {"eval_path": f"/tmp/{LONG}/e.jsonl"}}, "File name too long"),
    ({"model": {"name_or_path": "/" + LONG}}, "model.name_or_path"),
    ({"data": {"path": "bad\0name.jsonl"}}, "NUL character"),
    ({"distributed": {"strategy": "ddp", "num_gpus": 2, "accelerate_config": ""}}, "distributed.accelerate_config"),
    ({"distributed": {"strategy": "ddp", "num_gpus": 2, "accelerate_config": " "}}, "is empty"),
]


@pytest.mark.parametrize("sections,fragment", PATH_KEYS, ids=[f"{s}"[:50] for s, _ in PATH_KEYS])
def test_every_path_key_is_refused_blank_or_unusable(ws, sections, fragment):
    path = ws.recipe(**sections)
    refused_cleanly(ws.train(path), 2, fragment, ws.watch(path))


def test_an_os_error_met_later_on_a_given_path_names_its_flag(tmp_path):
    """The boundary's mapping: an OS error on the flag's path, inside it or on a parent of it names the flag."""
    import errno

    from qlora_trainer.cli import boundary

    flags = {"--output-dir": tmp_path / "run", "--recipe": "tiny-demo"}
    cases = [(OSError(errno.ENAMETOOLONG, "File name too long", str(tmp_path / "run" / "x")),
              f"--output-dir {tmp_path / 'run'}: {tmp_path / 'run' / 'x'}: File name too long; a name in it"),
             (OSError(errno.ELOOP, "Too many levels of symbolic links", str(tmp_path / "run")),
              f"--output-dir {tmp_path / 'run'}: Too many levels"),
             (PermissionError(errno.EACCES, "Permission denied", str(tmp_path)), "--output-dir"),
             (OSError(errno.ENAMETOOLONG, "File name too long", "/elsewhere/y"), "/elsewhere/y: File name too long")]
    for error, fragment in cases:
        def fail():
            raise error
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert boundary(fail, False, [], flags) == 2
        assert err.getvalue().count("\n") == 1 and fragment in err.getvalue(), err.getvalue()


PATH_TEXT = st.one_of(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12),
                      st.text(alphabet="ab/. ", max_size=40), st.text(alphabet="ab", min_size=250, max_size=600),
                      st.lists(st.text(alphabet="abc", min_size=1, max_size=300), min_size=1, max_size=3).map("/".join))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(PATH_TEXT)
def test_property_any_output_path_is_refused_cleanly_or_used(tmp_path, monkeypatch, value):
    """Whatever --output is (blank, long, odd characters, deep), an export of a missing source ends in exit 2 with
    one line, blames the flag when the OS cannot use the path, and creates nothing."""
    from qlora_trainer.files.given_paths import unusable

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    if value.strip() and unusable(value) is None:
        fragment = "already exists" if Path(value).exists() else "does not exist"
    else:
        fragment = "--output"
    # `--output=VALUE`: a value starting with "-" (hypothesis found "-:") is otherwise argparse's next option.
    line = refused_cleanly(["export", str(tmp_path / "no-such-run"), f"--output={value}"], 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, line


# ---------------------------------------------------------------- data.columns


def test_a_mapping_to_a_missing_column_is_refused_even_when_our_names_exist(ws):
    """The rows have prompt/completion and no `question`: the mapping used to be ignored, training on `prompt`."""
    path = ws.recipe(data={"columns": {"prompt": "question"}})
    line = refused_cleanly(ws.train(path), 2, "data.columns maps prompt to column 'question'", ws.watch(path))
    assert "prompt, completion" in line and str(ws.data) in line
    eval_rows = ws.root / "eval.jsonl"
    eval_rows.write_text(jsonl([{"question": "q", "prompt": "p", "completion": "c"}] * 2), encoding="utf-8")
    data = ws.root / "q.jsonl"
    data.write_text(jsonl([{"question": r["prompt"], "completion": r["completion"]} for r in ROWS]), encoding="utf-8")
    mapped = ws.recipe(name="mapped.yaml", data={"path": str(data), "columns": {"prompt": "question", "completion": "a"}})
    refused_cleanly(ws.train(mapped), 2, "completion to column 'a'", ws.watch(mapped, data))


COLUMN = st.sampled_from(["prompt", "completion", "q", "a", "text", "extra"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(COLUMN, st.text(alphabet="xyz ", min_size=1, max_size=5), min_size=1), min_size=1,
                max_size=4),
       st.dictionaries(st.sampled_from(["prompt", "completion", "text"]), COLUMN, max_size=3))
def test_property_a_mapping_takes_each_field_from_its_column_or_is_refused(tmp_path, rows, columns):
    """Each mapped field holds its column's value (also when two fields share one or swap), every other column
    is kept, and a mapping that names a column no row has is refused, naming data.columns."""
    path = tmp_path / "rows.jsonl"
    path.write_text(jsonl(rows), encoding="utf-8")
    section = validate({"model": {"name_or_path": "m"}, "data": {"path": str(path), "columns": columns,
                                                                  "format": "text"}}, "t").data
    present = {key for row in rows for key in row}
    from qlora_trainer.dataset.data import _read_source

    try:
        raw = _read_source(str(path), section, "path")
    except UserError as err:
        assert any(theirs not in present for theirs in columns.values()) and "data.columns maps" in str(err)
        return
    assert all(theirs in present for theirs in columns.values())
    for (_, got, _), row in zip(raw.rows, rows):
        expected = {k: v for k, v in row.items() if k not in columns.values()}
        for ours, theirs in columns.items():
            if theirs in row:
                expected[ours] = row[theirs]
            else:
                expected.pop(ours, None)
        assert got == expected


# ---------------------------------------------------------------- --set is blamed, not the recipe file


@pytest.mark.parametrize("override,fragment", BAD_SETS, ids=[o for o, _ in BAD_SETS])
def test_a_bad_set_names_the_set_not_the_recipe_file(ws, override, fragment):
    path = ws.recipe(train={"seq_len": 64, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
                            "device": "cpu", "seed": 7, "gpu_memory_gib": 8})
    line = refused_cleanly(ws.train(path, "--set", override), 2, fragment, ws.watch(path))
    assert str(path) not in line and "(line" not in line, line


def test_a_file_problem_beside_a_set_problem_keeps_the_file_and_its_line(ws):
    path = ws.recipe("model: {name_or_path: M}\ndata: {path: D}\nlora: {r: 0}\n".replace("M", str(ws.model))
                     .replace("D", str(ws.data)))
    line = refused_cleanly(ws.train(path, "--set", "train.seed=-1"), 2, "2 problems", ws.watch(path))
    assert f"{path}: 2 problems: lora.r (line 3)" in line and "--set train.seed=-1: train.seed" in line
    section = refused_cleanly(ws.train(path, "--set", "lora.r=4", "--set", "train={max_steps: 0}"), 2,
                              "--set train={max_steps: 0}: train.max_steps must be", ws.watch(path))
    assert str(path) not in section


# ---------------------------------------------------------------- --resume: only a run, read with one-line readers


def test_resume_refuses_a_directory_that_is_not_a_run(ws, monkeypatch):
    """`--output-dir . --resume` in a project directory used to train into it and replace its recipe.yaml."""
    project = ws.root / "project"
    project.mkdir()
    (project / "recipe.yaml").write_text("my own notes\n")
    monkeypatch.chdir(project)
    refused_cleanly(["--recipe", str(ws.recipe()), "--output-dir", ".", "--resume"], 2,
                    "is not a run directory (no estimate.json", ws.watch(project))


@pytest.mark.parametrize("saved,fragment", [("model: {name_or_path: [unclosed\n", "YAML syntax error"),
                                            ("- a list\n", "holds a YAML list"),
                                            ("model: {a: 1}\nmodel: {a: 2}\n", "given twice"),
                                            (b"\xff\xfe", "not UTF-8")])
def test_resume_names_a_damaged_saved_recipe(ws, saved, fragment):
    ws.run.mkdir()
    (ws.run / "recipe.yaml").write_bytes(saved if isinstance(saved, bytes) else saved.encode())
    (ws.run / "estimate.json").write_text("{}")
    path = ws.recipe()
    line = refused_cleanly(ws.train(path, "--resume"), 2, fragment, [ws.run, path])
    assert str(ws.run / "recipe.yaml") in line and "copy the recipe the run was started with" in line


# ---------------------------------------------------------------- two runs into one --output-dir


def test_a_run_directory_in_use_by_another_run_is_refused_and_left_alone(ws):
    from qlora_trainer.files.staging import held

    ws.run.mkdir()
    for resume in ([], ["--resume"]):
        if resume:
            (ws.run / "recipe.yaml").write_text("model: {}\n")
            (ws.run / "estimate.json").write_text("{}")
        with held(ws.run):  # another run, in this process or any other
            refused_cleanly(ws.train(ws.recipe(), *resume), 2, "is in use by another run", ws.watch())


def test_a_run_refused_for_a_directory_made_meanwhile_removes_nothing_of_it(ws):
    """The directory did not exist when the run began; another run made and filled it before this one claimed it:
    refusing must not take away what the other run wrote (the run used to remove what it had meant to make)."""
    from contextlib import ExitStack

    from qlora_trainer.files.run_dir import prepare_run_dir

    ws.run.mkdir()
    (ws.run / "recipe.yaml").write_text("the other run's\n")
    with ExitStack() as hold, pytest.raises(UserError, match="not empty"):
        prepare_run_dir(ws.run, False, hold)
    assert (ws.run / "recipe.yaml").read_text() == "the other run's\n"


def test_parents_made_by_a_failed_export_keep_what_another_export_wrote(tmp_path):
    from qlora_trainer.files.made_dirs import make_dirs, remove_empty

    made = make_dirs(tmp_path / "a" / "b")
    assert made == [tmp_path / "a" / "b", tmp_path / "a"]
    assert make_dirs(tmp_path / "a" / "b") == []  # another process's view: nothing of it is theirs
    (tmp_path / "a" / "b" / "other-export").mkdir()
    remove_empty(made)
    assert (tmp_path / "a" / "b" / "other-export").is_dir()


def assert_one_won(results, winners_fragments, losers_fragments):
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [(r.returncode, r.stderr[-1500:]) for r in results]
    loser = next(r for r in results if r.returncode == 2)
    lines = [line for line in loser.stderr.splitlines() if line.startswith("qlora-trainer: error:")]
    assert len(lines) == 1 and "Traceback" not in loser.stderr, loser.stderr[-2000:]
    assert any(fragment in lines[0] for fragment in losers_fragments), lines[0]


def start_together(*argvs: list[str]) -> list:
    import subprocess
    import sys

    from helpers import REPO

    procs = [subprocess.Popen([sys.executable, "-m", "qlora_trainer", *argv], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_runs_started_together_into_one_output_dir(tiny_model_dir, tmp_path):
    """Exactly one trains; the other is refused with one line and takes away nothing of the winner's run."""
    from helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_model_dir, train={"max_steps": 2})
    run = tmp_path / "runs" / "shared"
    results = start_together(*[["--recipe", str(recipe), "--output-dir", str(run)]] * 2)
    assert_one_won(results, [], ["is in use by another run", "already exists and is not empty",
                                 "already holds a finished run"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and (run / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- two exports into one --output


def test_an_output_that_appears_while_exporting_is_refused_not_replaced(adapter_dir, tmp_path, monkeypatch):
    """The output is checked at the start and again, atomically, by the final move: another export that
    finished first is kept, and this one leaves nothing (no staging directory, no parent it made)."""
    import qlora_trainer.deploy.export as export_module

    out = tmp_path / "new" / "out"
    original = export_module._write_model_card

    def another_export_finishes_first(target, *args):
        out.mkdir()
        (out / "model.safetensors").write_text("the other export")
        original(target, *args)

    monkeypatch.setattr(export_module, "_write_model_card", another_export_finishes_first)
    refused_cleanly(["export", str(adapter_dir), "--output", str(out), "--no-verify"], 2,
                    "appeared while this export ran", [])
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the other export"
    shutil.rmtree(out)
    assert main(["export", str(adapter_dir), "--output", str(out), "--no-verify", "--force"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").read_bytes() != b"the other export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_the_final_move_claims_the_output_atomically(tmp_path):
    from qlora_trainer.files.staging import rename_no_replace

    source = tmp_path / "staging"
    source.mkdir()
    (source / "f").write_text("x")
    for existing in ("empty-dir", "file", "link"):
        target = tmp_path / existing
        {"empty-dir": target.mkdir, "file": lambda: target.write_text("y"),
         "link": lambda: target.symlink_to(tmp_path / "nowhere")}[existing]()
        with pytest.raises(FileExistsError):
            rename_no_replace(source, target)
        assert (source / "f").read_text() == "x" and (target.is_symlink() or target.exists())
    rename_no_replace(source, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "x" and not source.exists()


@pytest.mark.slow
def test_two_exports_started_together_into_one_output(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    results = start_together(*[["export", str(adapter_dir), "--output", str(out), "--no-verify"]] * 2)
    assert_one_won(results, [], ["appeared while this export ran", "already exists"])
    assert {"config.json", "model.safetensors", "export.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no staging directory is left"


# ---------------------------------------------------------------- the tools share the boundary


def load_tool(name: str):
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL_CASES = [
    ("measure_vram", ["--arch", "llama-99b", "--device", "cpu"], 2, "--arch 'llama-99b' is not a known architecture"),
    ("measure_vram", ["--arch", "llama2-7b", "--device", "cpu"], 2, "did you mean llama-2-7b?"),
    ("measure_vram", ["--device", "cpu", "--config-override", "{bad"], 2, "--config-override is not JSON"),
    ("measure_vram", ["--device", "cpu", "--config-override", "[1]"], 2, "holds a JSON list"),
    ("measure_vram", ["--device", "cpu", "--workdir", ""], 2, "--workdir is empty"),
    ("measure_vram", ["--device", "cpu", "--out", LONG], 2, "--out"),
    ("bench_speed", ["--device", "cpu", "--arch", "nope"], 2, "--arch 'nope' is not a known architecture"),
    ("bench_speed", ["--device", "cpu", "--runs", "ours-auto,theirs"], 2, "unknown run 'theirs'"),
    ("bench_speed", ["--device", "cpu", "--unsloth-path", " "], 2, "--unsloth-path is empty"),
]


@pytest.mark.parametrize("tool,argv,code,fragment", TOOL_CASES, ids=[f"{t}:{' '.join(a)[:40]}" for t, a, _, _ in TOOL_CASES])
def test_the_tools_refuse_bad_input_with_one_line(tool, argv, code, fragment, monkeypatch, capsys, tmp_path):
    import sys

    module = load_tool(tool)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", *argv])
    monkeypatch.chdir(tmp_path)
    assert module.main() == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(f"{tool}: error:")]
    assert len(lines) == 1 and fragment in lines[0], captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_error_in_a_tool_is_one_line_with_its_traceback_saved(monkeypatch, capsys, tmp_path):
    import sys

    module = load_tool("measure_vram")

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(module, "measure", broken)
    monkeypatch.setattr(sys, "argv", ["measure_vram.py", "--device", "cpu", "--arch", "llama-2-7b",
                                      "--out", str(tmp_path / "r.jsonl")])
    assert module.main() == 1
    err = capsys.readouterr().err
    assert err.count("measure_vram: error: internal error: KeyError") == 1 and "Traceback" not in err
