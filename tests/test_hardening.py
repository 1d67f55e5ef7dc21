"""Issue 15, part B: a corpus of bad and awkward inputs across recipes, --set, datasets, model directories,
export, generate, estimate and --resume. Each case asserts exit 2, exactly one `qlora-trainer: error:` line naming
the cause, no traceback, and nothing under the watched paths created, changed or removed (helpers.refused_cleanly).
Almost every case is refused before any weights load; the few that need a trained adapter share `demo_run`.
Then the behaviour that changed for good input: BOM files, --set SECTION={...}, file modes under the umask.
"""

from __future__ import annotations

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
    shutil.copy(demo_run / "base_fingerprint.json", ws.run / "base_fingerprint.json")
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
    from qlora_trainer.estimate.memory_report import shape_for_model
    from qlora_trainer.loading.model_checks import check_lora_targets

    shape = shape_for_model(str(tiny_model_dir))
    valid = bool(targets) and all(any(l.name == t or l.name.endswith("." + t) for l in shape.linears) for t in targets)
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
