"""llama.cpp's own HF-to-GGUF converter: where it comes from and how it is run.

The per-model conversion logic (`convert_hf_to_gguf.py`, its `conversion/` package and `convert_lora_to_gguf.py`)
is not on PyPI as a package; it ships in the `llama-cpp-python` sdist under `vendor/llama.cpp/`, together with the
`gguf-py` it must run with (PyPI's `gguf` 0.19 lacks what this converter imports). Installing llama-cpp-python
would compile llama.cpp (about 18 minutes on 2 cores) and its wheel does not carry these scripts, so on first use
the pinned sdist is fetched with pip and only those Python files are unpacked into the cache. Nothing of llama.cpp
is copied into this repository. The converter runs in a subprocess: it puts its own `gguf-py` first on `sys.path`,
which must not replace the PyPI `gguf` that transformers reads GGUF files with in this process.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qlora_trainer.errors import UserError

# The converter's model table and tokenizer hashes change between releases; a pinned one is what the tests ran.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_ENV = "QLORA_TRAINER_LLAMA_CPP_SDIST"  # a local llama_cpp_python-VERSION.tar.gz, for machines without an index
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_KEEP_FILES = {"convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE"}
_KEEP_DIRS = ("conversion/", "gguf-py/")


def converter_dir() -> Path:
    """The unpacked converter, fetched and unpacked on first use."""
    from qlora_trainer.loading.demo_model import cache_dir

    target = cache_dir() / "llama-cpp-converter" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        sdist = Path(os.environ[SDIST_ENV]) if os.environ.get(SDIST_ENV) else _download_sdist(Path(tmp))
        staging = Path(tmp) / "unpacked"
        _unpack(sdist, staging)
        try:
            staging.rename(target)
        except OSError:  # another process unpacked it meanwhile
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    return target


def _download_sdist(into: Path) -> Path:
    print(f"Fetching llama.cpp's GGUF converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source, first use only) ...",
          file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--dest", str(into)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or ["pip found no sdist"])[-1]
        raise UserError(f"cannot fetch llama.cpp's GGUF converter (pip download llama-cpp-python=="
                        f"{LLAMA_CPP_PYTHON_VERSION}: {reason}); download that sdist elsewhere and set {SDIST_ENV} "
                        "to its path")
    return found[0]


def _unpack(sdist: Path, target: Path) -> None:
    """Only the converter's Python files: the sdist's C++ sources are never built or kept."""
    try:
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(_VENDOR) and _wanted(m.name[len(_VENDOR):])]
            if not any(m.name.endswith("/convert_hf_to_gguf.py") for m in members):
                raise UserError(f"{sdist} holds no {_VENDOR}convert_hf_to_gguf.py; {SDIST_ENV} must name the "
                                f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist")
            for member in members:
                member.name = member.name[len(_VENDOR):]
            archive.extractall(target, members=members, filter="data")
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"{sdist}: cannot unpack llama.cpp's converter from it ({err}); {SDIST_ENV} must name the "
                        f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist") from None


def _wanted(relative: str) -> bool:
    return relative in _KEEP_FILES or relative.startswith(_KEEP_DIRS)


@functools.cache  # a subprocess that imports the whole converter: once per process
def supported_architectures() -> frozenset[str]:
    """The HF architectures (`LlamaForCausalLM`, ...) the converter has text-model logic for."""
    output = _run(["convert_hf_to_gguf.py", "--print-supported-models"], "list the converter's models")
    names, in_text = set(), False
    for line in output.splitlines():
        if line.strip().endswith("models:"):
            in_text = line.strip() == "TEXT models:"
        elif in_text and line.strip().startswith("- "):
            names.add(line.strip()[2:])
    return frozenset(names)


def convert_model(model_dir: Path, outfile: Path, quant: str, space_after_special: bool) -> None:
    """`space_after_special`: whether the training tokenizer starts text that follows a special token with a
    space (space_after_special_tokens)."""
    prepare_tokenizer_config(model_dir, space_after_special)
    _run(["convert_hf_to_gguf.py", _absolute(model_dir), "--outfile", _absolute(outfile), "--outtype", quant],
         f"convert {model_dir.name} to GGUF")


def convert_adapter(adapter_dir: Path, base_dir: Path, outfile: Path, quant: str) -> None:
    _run(["convert_lora_to_gguf.py", _absolute(adapter_dir), "--base", _absolute(base_dir), "--outfile",
          _absolute(outfile), "--outtype", quant], "convert the adapter to GGUF")


def _absolute(path: Path) -> str:
    """The converter runs in its own directory (_run), where a path relative to ours names nothing."""
    return str(Path(path).resolve())


def prepare_tokenizer_config(model_dir: Path, space_after_special: bool) -> None:
    """Tell the converter what transformers 5 no longer writes into tokenizer_config.json.

    - `added_tokens_decoder`: the converter's SentencePiece path learns which tokens are added (control or
      user-defined, kept whole by llama.cpp) only from it; without it `<|im_end|>` becomes an ordinary piece that
      llama.cpp cuts into bytes.
    - `add_prefix_space`, for a SentencePiece vocabulary: llama.cpp puts a space before every piece of text that
      follows a special token unless the GGUF says otherwise, and the converter's llama path writes this key into
      the GGUF. A tokenizer that marks a space only at the start of the text (transformers 5 converts
      SentencePiece models so, as Mistral v0.3 publishes its tokenizer) trained every chat turn without it."""
    tokenizer_json, config_path = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    if not tokenizer_json.is_file() or not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" not in config:
        added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
        config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    if (model_dir / "tokenizer.model").is_file():
        config["add_prefix_space"] = space_after_special
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


SPACE_MARK = "\u2581"  # SentencePiece's visible space


def space_after_special_tokens(tokenizer) -> bool:
    """Whether the tokenizer starts the text after a special token with SentencePiece's space mark, as llama.cpp's
    SentencePiece tokenizer does with `add_space_prefix` (its default)."""
    special = tokenizer.eos_token or tokenizer.all_special_tokens[0]
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(special + "a", add_special_tokens=False)["input_ids"])
    return len(pieces) > 1 and pieces[1].startswith(SPACE_MARK)


def _run(arguments: list[str], doing: str) -> str:
    directory = converter_dir()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # it must use its own gguf-py
    result = subprocess.run([sys.executable, str(directory / arguments[0]), *arguments[1:]], capture_output=True,
                            text=True, env=env, cwd=directory)
    if result.returncode != 0:
        raise UserError(f"llama.cpp's converter could not {doing}: {_reason(result.stderr)}")
    return result.stdout + result.stderr


def _reason(stderr: str) -> str:
    """The converter's own last word: the exception line, else its last error log line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("NotImplementedError", "ValueError", "KeyError", "AssertionError", "FileNotFoundError",
                            "ImportError", "ModuleNotFoundError", "TypeError", "RuntimeError", "ERROR:")):
            return line
    return lines[-1] if lines else "it exited without a message"

