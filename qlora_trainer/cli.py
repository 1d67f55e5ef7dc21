"""The command line: parse, dispatch, and turn known errors into one-line messages with DESIGN.md's exit codes."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from qlora_trainer.console import quiet_libraries
from qlora_trainer.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InternalError,
    TrainingFailed,
    UserError,
    one_line,
)

COMMANDS = ("train", "estimate", "export", "generate", "recipes", "keys")
DEBUG_HELP = "on an error, also print the full traceback (it always goes to a log file)"


EXAMPLES = """examples:
  python -m qlora_trainer --recipe tiny-demo                     the CPU demo, about a minute
  python -m qlora_trainer --recipe llama7b-r8 --dry-run          check everything short of loading weights
  python -m qlora_trainer estimate --recipe llama7b-r8 --gpu-memory 12
  python -m qlora_trainer generate runs/tiny-demo-*/ --prompt 'Tweet: charged twice\\nLabel:'
  python -m qlora_trainer recipes                                the shipped recipes; `keys`: every recipe key

Each command has its own --help. Without a command, qlora-trainer trains:
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and each option's default where it has one (flags and unset options have none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def schema_choices(section: str, key: str) -> list[str]:
    """A flag's choices as the recipe schema states them for the same key, so the two cannot drift apart."""
    import typing

    from qlora_trainer.config.recipe import Recipe

    annotation = Recipe.model_fields[section].annotation.model_fields[key].annotation
    return list(typing.get_args(annotation))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-trainer", formatter_class=HelpFormatter,
        description="Fine-tune a language model with QLoRA on one GPU, and know before the run whether it fits.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug also after the command: each subcommand knows it, without overriding the top level's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    train = sub.add_parser("train", parents=[common], help="train a recipe (the default command)")
    _add_recipe_args(train)
    train.add_argument("--output-dir", type=path_arg, help="run directory (default runs/<recipe>-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    train.add_argument("--dry-run", action="store_true", help="check the recipe, the rows and the tokenizer as the run "
                       "would, print the plan and the estimate, and say what could not be checked here; load no weights")
    train.add_argument("--force", action="store_true", help="run even where the run is predicted not to fit")
    train.add_argument("--gpu-memory", type=float, metavar="GIB",
                       help="cap this process's GPU memory at GIB and plan the auto settings for it (train.gpu_memory_gib)")

    est = sub.add_parser("estimate", parents=[common], help="predict the peak GPU memory of a run before loading anything")
    source = est.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help="shipped recipe name or path to a YAML recipe")
    source.add_argument("--model", help="local model directory, config.json, known architecture or hub id")
    source.add_argument("--model-size", help="a size such as 7B: picks the default family for that size")
    source.add_argument("--table", action="store_true", help="trainable-parameter share by rank and model")
    est.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key (with --recipe)")
    est.add_argument("--rank", type=int, help="LoRA rank (default: the recipe default, 8)")
    est.add_argument("--seq-len", type=int, help="sequence length (default 2048)")
    est.add_argument("--batch-size", type=int, help="micro-batch size (default 1)")
    est.add_argument("--optimizer", choices=schema_choices("train", "optimizer"), help="the optimizer whose state is counted")
    est.add_argument("--no-gradient-checkpointing", action="store_true", help="estimate without checkpointing")
    est.add_argument("--gpus", type=int, help="GPUs the run is spread over (default: the recipe's distributed.num_gpus, else 1)")
    est.add_argument("--strategy", choices=schema_choices("distributed", "strategy"), help="multi-GPU strategy (default: the recipe's, "
                     "else ddp with --gpus above 1)")
    est.add_argument("--cpu-offload", action="store_true", help="FSDP with parameters and optimizer state in CPU RAM")
    est.add_argument("--gpu-memory", type=float, metavar="GIB", help="GPU memory in GiB: adds fits and headroom")
    est.add_argument("--fit", action="store_true", help="with --gpu-memory: the longest seq_len and largest micro-batch that fit")
    est.add_argument("--json", action="store_true", help="print the contract's JSON instead of a table")

    exp = sub.add_parser("export", parents=[common], help="merge an adapter into its base and write fp16/bf16 safetensors")
    exp.add_argument("source", type=path_arg, help="run directory or adapter directory")
    exp.add_argument("--output", type=path_arg, required=True, help="directory to write (must not exist unless --force)")
    exp.add_argument("--dtype", choices=schema_choices("export", "dtype"), help="dtype of the export (default: the recipe's export.dtype, else float16)")
    exp.add_argument("--base-weights", choices=["dequantized", "original"], default="dequantized",
                     help="merge into the NF4-rounded weights training saw (default, exact) or the original 16-bit ones")
    exp.add_argument("--base", help="base model to merge into (default: the one the run or adapter names)")
    exp.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (the merge holds about two in memory)")
    exp.add_argument("--no-verify", action="store_true", help="skip comparing the export's logits with the 4-bit model")
    exp.add_argument("--force", action="store_true", help="replace an existing --output")
    exp.add_argument("--format", choices=["safetensors", "gguf", "gguf-adapter"], default="safetensors",
                     help="gguf: one verified .gguf file plus an Ollama Modelfile (llama.cpp, Ollama); gguf-adapter: "
                     "the adapter alone, for Ollama's ADAPTER line (see docs/export.md)")
    exp.add_argument("--quant", choices=["f16", "bf16", "q8_0"], help="with --format gguf or gguf-adapter: the GGUF's "
                     "weight type (default f16)")

    gen = sub.add_parser("generate", parents=[common], help="generate text from a run, an adapter or a merged export")
    gen.add_argument("source", type=path_arg, help="run directory, adapter directory or merged export")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help=r"one prompt; write a line break as \n, e.g. 'Tweet: late again\nLabel:'")
    prompts.add_argument("--file", type=path_arg, help=r"a text file with one prompt per line (line breaks as \n), or a "
                         ".jsonl file of rows with a prompt field, such as training's prompt/completion data")
    gen.add_argument("--base", help="base model for an adapter (default: the one it names)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 decodes greedily")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens up to this mass")

    sub.add_parser("recipes", parents=[common], help="list the shipped recipes with their estimated GPU memory")
    keys = sub.add_parser("keys", parents=[common], help="every recipe key with its type, default and description")
    keys.add_argument("--markdown", action="store_true", help="print a Markdown table (as in docs/recipe-keys.md)")
    # The default command's options belong in the top-level help: most people never type `train`.
    parser.epilog = EXAMPLES + train.format_help()
    return parser


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="shipped recipe name or path to a YAML recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.max_steps=50 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    """The one boundary: whatever goes wrong below ends here as one `qlora-trainer: error:` line and an exit code
    (docs/errors.md), never as a traceback on the terminal unless --debug asks for it."""
    given = list(sys.argv[1:] if argv is None else argv)
    first = next((arg for arg in given if arg != "--debug"), None)
    args = build_parser().parse_args(given if first in COMMANDS + ("-h", "--help") else ["train", *given])
    quiet_libraries()
    commands = {"train": _train, "estimate": _estimate, "export": _export, "generate": _generate, "recipes": _recipes,
                "keys": _keys}
    return boundary(lambda: commands[args.command](check_path_flags(args, PATH_FLAGS)), args.debug, given,
                    flag_values(args, PATH_FLAGS))


# The flags whose value is a path (or, for --recipe, --model and --base, a name or a path): argparse dest -> flag.
PATH_FLAGS = {"recipe": "--recipe", "output_dir": "--output-dir", "source": "SOURCE", "output": "--output",
              "file": "--file", "base": "--base", "model": "--model"}


def path_arg(text: str) -> Path | str:
    """argparse type of a path flag. Path('') is '.', the current directory: a blank value stays text, for
    check_path_flags to refuse by name."""
    return Path(text) if text.strip() else text


def check_path_flags(args: argparse.Namespace, flags: dict[str, str]) -> argparse.Namespace:
    """Refuse a path flag that is blank or that no command could use (too long, a symlink loop), naming it."""
    from qlora_trainer.files.given_paths import check_given

    for dest, flag in flags.items():
        check_given(getattr(args, dest, None), flag)
    return args


def flag_values(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, object]:
    """flag -> the value given, for naming the flag an OS error's path came from."""
    return {flag: getattr(args, dest) for dest, flag in flags.items() if getattr(args, dest, None) is not None}


def boundary(command: Callable[[], int], debug: bool, argv: list[str], flags: dict[str, object] | None = None,
             prog: str = "qlora-trainer") -> int:
    """Run `command` and turn whatever it raises into one `PROG: error:` line and an exit code. The command line
    and the tools (tools/measure_vram.py, tools/bench_speed.py) share it; `flags` (flag -> value) lets an OS
    error on a given path name its flag."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`... | head`): nothing to report, and no one to report it to
        _silence_stdout()
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - the boundary: every error becomes one line (exit 2 or 1)
        return _fail(err, debug, argv, flags or {}, prog)


def _fail(err: Exception, debug: bool, argv: list[str], flags: dict[str, object], prog: str) -> int:
    """Report an error that reached the boundary: ours as they are, an OS error on a given path as bad input
    (exit 2, naming its flag), anything else as an internal error (exit 1) whose traceback is saved
    (error_log.py) and printed with --debug."""
    import traceback

    from qlora_trainer.files.given_paths import os_error_line

    if debug:
        traceback.print_exception(err, file=sys.stderr)
    line = os_error_line(err, flags) if isinstance(err, OSError) else None
    if line is not None:
        err = UserError(line)
    if isinstance(err, (UserError, TrainingFailed)):
        _report(err, prog)
        return err.exit_code
    _report(_internal(err, argv), prog)
    return InternalError.exit_code


def _internal(err: Exception, argv: list[str]) -> InternalError:
    """The one line for an unexpected error, after saving its traceback: in the run directory a failed run kept
    (train.py marks the exception with it), else under the cache directory."""
    from qlora_trainer.distributed import current_launch
    from qlora_trainer.error_log import log_path, write_error_log

    internal = err if isinstance(err, InternalError) else InternalError.wrapping(err)
    launch = current_launch()
    log = None
    if launch.is_main or not getattr(err, "agreed", False):  # an agreed error is logged once, by the main process
        log = write_error_log(log_path(getattr(err, "run_dir", None), launch.rank), internal.details, argv)
    where = f"the full traceback is in {log}" if log else "the traceback could not be saved"
    line = InternalError(f"internal error: {internal}; {where}; rerun with --debug to print it, and please report it "
                         "if your input looks right")
    line.agreed = getattr(err, "agreed", False)
    return line


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail on the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests): nothing will flush to the pipe
        pass


def _report(err: Exception, prog: str) -> None:
    """One line on stderr. Under a multi-process launch an error all processes agreed on is printed once, by the
    main process; an error only one process met is printed by it, naming it."""
    from qlora_trainer.distributed import current_launch

    launch = current_launch()
    if launch.distributed and not launch.is_main:
        if getattr(err, "agreed", False):
            return
        err = f"process {launch.rank}: {err}"
    print(f"{prog}: error: {one_line(str(err))}", file=sys.stderr)


def _train(args) -> int:
    from qlora_trainer.config.recipe_files import load_recipe
    from qlora_trainer.files.run_dir import default_run_dir
    from qlora_trainer.training.train import RunOptions, train

    recipe, path = load_recipe(args.recipe, args.overrides)
    name = path.parent.name if path.name == "recipe.yaml" else path.stem  # a run's saved recipe: name it after the run
    if args.resume and args.output_dir is None:
        raise UserError("--resume needs --output-dir: the run directory to continue")
    options = RunOptions(recipe_name=name, output_dir=args.output_dir or default_run_dir(name), resume=args.resume,
                         dry_run=args.dry_run, force=args.force, gpu_memory=_gib_flag(args.gpu_memory))
    train(recipe, options)
    return EXIT_OK


def _estimate(args) -> int:
    import dataclasses
    import json

    from qlora_trainer.config.recipe_files import load_recipe
    from qlora_trainer.estimate import auto_settings, estimate_output, fit_rule, fit_search
    from qlora_trainer.estimate.memory import GIB, Settings, estimate
    from qlora_trainer.estimate.shape_lookup import shape_for_model, shape_for_size
    from qlora_trainer.loading.model_checks import check_lora_targets, check_seq_len

    if args.overrides and not args.recipe:
        raise UserError("--set needs --recipe; with --model use --rank, --seq-len, --batch-size, --optimizer")
    if args.table:
        print("Trainable share of all parameters, LoRA on all linear layers (exact per architecture)")
        print(estimate_output.rank_table())
        return EXIT_OK
    global_batch, chosen = 16, None
    gpu_memory = _gib_flag(args.gpu_memory)
    if args.recipe:
        recipe, _ = load_recipe(args.recipe, args.overrides)
        shape = shape_for_model(recipe.model.name_or_path, recipe.model.trust_remote_code, recipe.model.revision)
        check_lora_targets(recipe.lora.target_modules, shape)
        check_seq_len(recipe.train.seq_len, shape)
        chosen = _planned(recipe, shape, gpu_memory)
        settings = chosen.estimate.settings
        global_batch = recipe.train.global_batch()
    else:
        shape = shape_for_model(args.model) if args.model else shape_for_size(args.model_size)
        settings = Settings(attn_implementation=shape.default_attention)  # as a recipe's `auto` would run it
    changes = {"rank": args.rank, "seq_len": args.seq_len, "batch_size": args.batch_size, "optimizer": args.optimizer,
               "num_gpus": args.gpus, "strategy": args.strategy}
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    settings = _launch_settings(settings, args)
    if args.no_gradient_checkpointing:
        settings = dataclasses.replace(settings, gradient_checkpointing=False)
    for flag, value in (("--rank", settings.rank), ("--seq-len", settings.seq_len), ("--batch-size", settings.batch_size)):
        if value <= 0:
            raise UserError(f"{flag} must be a positive integer (got {value})")
    if args.seq_len is not None:
        check_seq_len(args.seq_len, shape, "--seq-len")
    if args.fit and gpu_memory is None:
        raise UserError("--fit needs --gpu-memory GIB: the memory to fit into")
    est = estimate(shape, settings)
    changed = args.no_gradient_checkpointing or any(v is not None for v in changes.values())
    if chosen is not None and not changed:
        result = auto_settings.estimate_json(est, chosen)
    else:  # flags overrode what the plan chose: the estimate is for the flags
        result, chosen = estimate_output.estimate_json(est, gpu_memory), None
    if args.fit:
        result["fit"] = fit_search.fit(shape, settings, gpu_memory, global_batch)
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(estimate_output.format_estimate(est, gpu_memory))
    if chosen is not None and chosen.chosen:
        print(f"  auto: {chosen.describe()}")
    if gpu_memory is not None and not fit_rule.fits(est.total / GIB, gpu_memory):
        fixes = fit_search.fixes_that_fit(shape, settings, fit_rule.usable_gib(gpu_memory))
        print("  to fit, try: " + (", or ".join(fixes) if fixes else "a smaller model or a larger GPU")
              + ("" if args.fit else " (or --fit for the longest seq_len and largest micro-batch that fit)"))
    if args.fit:
        found = result["fit"]
        print(f"Largest that fits {gpu_memory:g} GiB: seq_len {found['seq_len']}, micro-batch {found['micro_batch_size']} "
              f"x accumulation {found['gradient_accumulation_steps']} ({found['total_gib']:.2f} GiB)"
              if found["fits"] else f"Nothing fits {gpu_memory:g} GiB: {found['reason']}")
    return EXIT_OK


def _planned(recipe, shape, gpu_memory: float | None):
    """The plan for the `auto` settings on a GPU of `gpu_memory` GiB (the defaults without one); its estimate
    assumes unpacked rows, the worst case, since no row is read."""
    from qlora_trainer.estimate.auto_settings import plan
    from qlora_trainer.estimate.gpu_budget import host_ram_gib
    from qlora_trainer.estimate.types import Budget

    budget = Budget(gpu_memory, f"--gpu-memory {gpu_memory:g}", host_ram_gib()) if gpu_memory is not None else Budget(
        None, "no --gpu-memory given: the defaults; pass --gpu-memory GIB to choose")
    return plan(recipe, shape, budget, on_gpu=True)


def _gib_flag(value: float | None) -> float | None:
    """--gpu-memory: a finite, positive number of GiB."""
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"--gpu-memory must be a positive number of GiB, e.g. --gpu-memory 24 (got {value})")
    return value


def _launch_settings(settings, args):
    """--gpus alone means DDP; --cpu-offload means FSDP; a single strategy is one GPU."""
    import dataclasses

    if args.gpus is not None and args.gpus <= 0:
        raise UserError(f"--gpus must be a positive integer (got {args.gpus})")
    if args.cpu_offload:
        if settings.strategy not in ("single", "fsdp") or args.strategy not in (None, "fsdp"):
            raise UserError("--cpu-offload is an FSDP option: use it with --strategy fsdp")
        settings = dataclasses.replace(settings, strategy="fsdp", cpu_offload=True)
    if args.strategy == "single":
        if (args.gpus or 1) > 1:
            raise UserError("--strategy single runs on one GPU: drop --gpus or choose --strategy ddp or fsdp")
        settings = dataclasses.replace(settings, num_gpus=1)
    if settings.strategy == "single" and settings.num_gpus > 1:
        settings = dataclasses.replace(settings, strategy="ddp")
    if settings.strategy != "fsdp":
        settings = dataclasses.replace(settings, cpu_offload=False)
    return settings


def _export(args) -> int:
    from qlora_trainer.deploy.export import ExportOptions, export

    if args.format != "safetensors":
        return _export_gguf(args)
    if args.quant:
        raise UserError("--quant applies to --format gguf or gguf-adapter; the safetensors export takes --dtype")

    options = ExportOptions(source=args.source, output=args.output, dtype=args.dtype, base_weights=args.base_weights,
                            base=args.base, max_shard_size=args.max_shard_size, verify=not args.no_verify, force=args.force)
    export(options)
    print(f"Exported to {args.output} ({options.dtype}); load it with AutoModelForCausalLM.from_pretrained('{args.output}')")
    return EXIT_OK


def _export_gguf(args) -> int:
    from qlora_trainer.deploy.gguf_export import GgufOptions, export_gguf

    refused = [flag for flag, given in (("--dtype", args.dtype), ("--no-verify", args.no_verify),
                                        ("--base-weights original", args.base_weights != "dequantized")) if given]
    if refused:
        raise UserError(f"{refused[0]} does not apply to --format {args.format} (a GGUF export is always the verified "
                        "NF4-round-trip merge; choose its type with --quant)")
    options = GgufOptions(source=args.source, output=args.output, quant=args.quant or "f16",
                          adapter_only=args.format == "gguf-adapter", base=args.base, force=args.force)
    report = export_gguf(options)
    print(f"Exported to {args.output / report['file']}; for Ollama: cd {args.output} && ollama create NAME -f Modelfile")
    return EXIT_OK


def _generate(args) -> int:
    from qlora_trainer.deploy.generate import GenerateOptions, format_prompt, generate, load_for_inference
    from qlora_trainer.deploy.prompts import read_prompts, shown

    if args.max_new_tokens <= 0 or not 0 < args.top_p <= 1 or args.temperature < 0:
        raise UserError("--max-new-tokens must be positive, --top-p in (0, 1], --temperature 0 or more")
    prompts = read_prompts(args.prompt, args.file)  # before loading the model: there would be nothing to generate
    model, tokenizer, source = load_for_inference(args.source, args.base)
    options = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    for prompt in prompts:
        print(f">>> {shown(prompt)}", flush=True)
        generate(model, tokenizer, format_prompt(prompt, source, tokenizer), options)
    return EXIT_OK


def _recipes(args) -> int:
    from qlora_trainer.config.recipe_files import launch_command, load_recipe, shipped_recipe_names, shipped_recipes_dir
    from qlora_trainer.estimate.memory import GIB
    from qlora_trainer.estimate.shape_lookup import shape_for_model

    rows, launches = [], []
    for name in shipped_recipe_names():
        recipe, _ = load_recipe(name)
        shape = shape_for_model(recipe.model.name_or_path, revision=recipe.model.revision)
        est = _planned(recipe, shape, None).estimate
        d = recipe.distributed
        gpus = "1" if d.strategy == "single" else f"{d.num_gpus} {d.strategy}{'+offload' if d.cpu_offload else ''}"
        rows.append((name, recipe.model.name_or_path, f"{est.total / GIB:5.1f} GiB", gpus, recipe.description))
        if d.strategy != "single":
            launches.append(f"  {name}: {launch_command(recipe, name)}")
    widths = [max(len(r[i]) for r in rows + [("recipe", "base model", "VRAM/GPU", "GPUs")]) for i in range(4)]
    print(f"Recipes in {shipped_recipes_dir()} (run one with: python -m qlora_trainer --recipe NAME)")
    print("  " + "  ".join(f"{h:<{w}}" for h, w in zip(("recipe", "base model", "VRAM/GPU", "GPUs"), widths)) + "  description")
    for row in rows:
        print("  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)) + f"  {row[4]}")
    if launches:
        print("Multi-GPU recipes start through accelerate (see docs/multi-gpu.md):")
        print("\n".join(launches))
    return EXIT_OK


def _keys(args) -> int:
    from qlora_trainer.config.recipe_keys import format_keys, recipe_keys

    print(format_keys(recipe_keys(), markdown=args.markdown))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

