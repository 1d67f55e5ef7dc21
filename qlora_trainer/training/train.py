"""One run from plan to summary.json.

The steps read from the top of `train()`: plan, run directory, model, data, trainer, train, save, summarise.
The libraries do the work; this module only wires them together (the trainer itself: trainer_setup.py) and
records what happened (run_summary.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import time
from pathlib import Path

import torch

from qlora_trainer import distributed
from qlora_trainer.config.recipe import Recipe
from qlora_trainer.config.recipe_files import dump_recipe, read_saved_recipe
from qlora_trainer.config.resolved_recipe import ResolvedRecipe
from qlora_trainer.dataset.data import check_data_path, load_data
from qlora_trainer.dataset.sequence_fit import describe_data, fit_to_tokenizer
from qlora_trainer.distributed import Launch
from qlora_trainer.errors import Interrupted, TrainingFailed, UserError, WontFitError, first_line
from qlora_trainer.estimate import auto_settings, gpu_budget
from qlora_trainer.estimate.estimate_output import format_estimate
from qlora_trainer.estimate.fit_search import check_fits, fixes_that_fit
from qlora_trainer.estimate.memory import GIB, ModelShape, estimate
from qlora_trainer.estimate.recipe_settings import settings_from_recipe
from qlora_trainer.estimate.shape_lookup import shape_for_model
from qlora_trainer.files.made_dirs import undo
from qlora_trainer.files.model_card import adapter_card
from qlora_trainer.files.run_dir import (
    CHECKPOINTS,
    SUMMARY,
    apply_umask,
    latest_checkpoint,
    prepare_run_dir,
    write_json_atomic,
    write_text_atomic,
)
from qlora_trainer.loading import base_fingerprint, continued_adapter, model_checks
from qlora_trainer.loading import model as model_lib
from qlora_trainer.training import dry_run, gpu_memory, speed_levers, trackers
from qlora_trainer.training.exact_match import held_out_exact_match
from qlora_trainer.training.failed_run import KeptOnlyOnceStepped
from qlora_trainer.training.metrics import plot_loss, read_metrics
from qlora_trainer.training.plan_report import describe_plan
from qlora_trainer.training.preference_eval import held_out_preference
from qlora_trainer.training.resume import WriteWhenLoaded, resumed_metrics, usable_checkpoint
from qlora_trainer.training.run_state import PreparedRun, RunContext, RunOptions
from qlora_trainer.training.run_summary import Outcome, describe_summary, memory_sampler, summarise
from qlora_trainer.training.safeguards import StopOnNonFinite, StopOnSignal
from qlora_trainer.training.trainer_setup import build_trainer


def pick_device(recipe: Recipe) -> str:
    return "cpu" if recipe.train.device == "cpu" else model_lib.default_device()


def check_device(recipe: Recipe, device: str, force: bool) -> None:
    if recipe.train.device == "cuda" and device != "cuda" and not force:
        raise WontFitError("train.device is cuda but no CUDA GPU is visible: a 4-bit model this size would take days "
                           "on the CPU; run on a GPU machine (or add --force to train on the CPU anyway)")


def train(recipe: Recipe, options: RunOptions) -> dict | None:
    """Run one training job; return the summary (None for a dry run, and in every process but the main one)."""
    launch = distributed.current_launch()
    device = pick_device(recipe)
    distributed.start(launch, device)
    # Each process computed its own default run directory name from the clock: use the main process's.
    options = dataclasses.replace(options, output_dir=distributed.on_main(lambda: options.output_dir, launch))
    with distributed.main_prints_only(launch):
        summary = _train(recipe, options, launch, device)
    distributed.finish(launch)
    return summary


def _train(recipe: Recipe, options: RunOptions, launch: Launch, device: str) -> dict | None:
    with distributed.together(launch):
        prepared = _prepare(recipe, options, launch, device)
    if prepared is None:
        return None
    with contextlib.ExitStack() as hold:  # the main process holds the run directory's lock until the run ends
        ctx = distributed.on_main(lambda: _open_run_dir(prepared, options, hold), launch)
        ctx = dataclasses.replace(ctx, launch=launch, device=device)  # this process's, not the main one's
        with KeptOnlyOnceStepped(ctx.run, ctx.made, options.resume, launch.is_main) as attempt:
            return _train_in(prepared, ctx, attempt)


def _train_in(prepared: PreparedRun, ctx: RunContext, attempt: KeptOnlyOnceStepped) -> dict | None:
    """The run from loading the model to summary.json, in the run directory `_open_run_dir` made."""
    recipe, data, tokenizer, launch, run = prepared.recipe, prepared.data, prepared.tokenizer, ctx.launch, ctx.run
    context_bytes = gpu_memory.context_bytes() if ctx.device == "cuda" else None

    torch.manual_seed(recipe.train.seed)
    guards = (StopOnSignal(), StopOnNonFinite())
    attempt.trainer = trainer = _build(prepared, ctx, (*guards, WriteWhenLoaded(run, ctx.deferred)))
    outcome = Outcome(report=model_lib.parameter_report(trainer.model), plan=prepared.plan)
    print(model_lib.format_parameter_report(outcome.report), flush=True)

    outcome.before = held_out_exact_match(recipe, trainer, tokenizer, data, launch, "before training")
    outcome.preference_before = held_out_preference(recipe, trainer, tokenizer, data, launch, "before training")
    started = time.perf_counter()
    outcome.result = _run_guarded(trainer, guards, ctx, prepared)
    outcome.runtime = time.perf_counter() - started
    outcome.after = held_out_exact_match(recipe, trainer, tokenizer, data, launch, "after training")
    outcome.preference_after = held_out_preference(recipe, trainer, tokenizer, data, launch, "after training")
    if data.eval is not None and not _evaluated_at(trainer, trainer.state.global_step):
        trainer.evaluate()  # every process takes part; MetricsLogger appends the result to metrics.jsonl
    try:
        trainer.save_adapter(run / "adapter")  # under FSDP every process takes part in gathering it
    except OSError as err:
        raise _saving_failed(run, err) from None
    outcome.memory = distributed.gather(
        gpu_memory.peak_memory_report(prepared.predicted.total, memory_sampler(trainer), context_bytes), launch)
    # DDP keeps the copies identical; a difference would mean the processes trained apart. FSDP holds shards.
    if launch.strategy != "fsdp":
        outcome.checksums = distributed.gather(model_lib.adapter_checksum(trainer.peft_model), launch)
    if outcome.checksums and len(set(outcome.checksums)) > 1:
        print(f"WARNING: the processes ended with different adapters ({outcome.checksums}); the main process's is saved")

    summary = distributed.on_main(lambda: _save_results(prepared, ctx, trainer, outcome), launch)
    print(describe_summary(summary, run))
    return summary if launch.is_main else None


def _prepare(recipe: Recipe, options: RunOptions, launch: Launch, device: str) -> PreparedRun | None:
    """Everything that can fail on bad input, before the run directory exists: plan, estimate, data, tokenizer,
    and the resolved recipe the run trains with and saves. A dry run goes as far, short of loading weights, and
    returns None after saying what it could not check here."""
    model_lib.resolve_model_path(recipe.model)  # a missing local model is named before anything else
    if recipe.model.adapter is not None:  # its LoRA settings are the run's: before the checks and the plan use them
        recipe = continued_adapter.adopt(recipe, model_lib.load_config(recipe.model))
    if options.gpu_memory is not None:
        recipe = recipe.replaced("train", gpu_memory_gib=options.gpu_memory)
    shape = shape_for_model(recipe.model.name_or_path, recipe.model.trust_remote_code, recipe.model.revision)
    model_checks.check_lora_targets(recipe.lora.target_modules, shape)
    model_checks.check_seq_len(recipe.train.seq_len, shape)
    # A dry run in one process plans for the launch the recipe is written for (distributed.*), as `estimate` does;
    # a run plans for the processes it has.
    planned = None if options.dry_run and not launch.distributed else launch
    chosen = _plan(recipe, options, planned, device, shape)
    check_launch(recipe, chosen.micro_batch_size, launch)
    print(describe_plan(recipe, options.recipe_name, options.output_dir, device, launch, chosen), flush=True)
    print(_memory_report(recipe, chosen, device, options.recipe_name), flush=True)
    check_data_path(recipe.data)
    trackers.check_trackers(recipe.train.report_to)
    unchecked = _check_machine(recipe, options, device, chosen, shape)

    if options.dry_run and not dry_run.readable_here(recipe, unchecked):
        print(dry_run.report(None, unchecked))
        return None
    # Before the run directory: bad data leaves nothing behind.
    data = load_data(recipe.data, recipe.train.seed, recipe.train.method)
    if recipe.eval.exact_match and not isinstance(data.eval[0].get("prompt"), str):
        raise UserError(f"eval.exact_match needs text prompt/completion rows (or alpaca); {data.source} is {data.format}")
    tokenizer = model_lib.load_tokenizer(recipe.model)
    model_checks.check_vocabulary(tokenizer, shape)
    data = fit_to_tokenizer(data, recipe.data, tokenizer, recipe.train.seq_len, recipe.model.name_or_path)
    resolved, notes = auto_settings.resolve(recipe, chosen, data.recipe_format, data.stats["train_mean_tokens"])
    data.notes += notes
    print(describe_data(data), flush=True)
    if options.dry_run:
        print(dry_run.report(data, unchecked))
        return None
    predicted = estimate(shape, settings_from_recipe(resolved, launch))
    return PreparedRun(resolved, shape, chosen, predicted, data, tokenizer)


def _check_machine(recipe: Recipe, options: RunOptions, device: str, chosen: auto_settings.Plan,
                   shape: ModelShape) -> list[str]:
    """The checks that depend on this machine: the device, the CUDA-only levers and whether the run fits. A dry run
    on a machine without a GPU plans for one elsewhere: what would stop the run here is said, not raised."""
    unchecked = []
    try:
        check_device(recipe, device, options.force)
        speed_levers.check_levers(recipe.train, device)  # explicit values: an `auto` never needs CUDA
    except UserError as err:
        if not options.dry_run:
            raise
        unchecked.append(f"this machine: the run would stop here (exit {err.exit_code}): {err}")
    if device == "cuda":
        check_fits(chosen.estimate, shape, chosen.budget.gib, chosen.budget.source, options.force)
        if recipe.train.gpu_memory_gib is not None and not options.dry_run:
            gpu_budget.apply_cap(recipe.train.gpu_memory_gib)
    elif recipe.train.device == "cuda":
        unchecked.append("free GPU memory: there is no GPU here; " + (
            f"planned for {chosen.budget.source}" if chosen.budget.gib is not None
            else "pass --gpu-memory GIB to plan for a card"))
    return unchecked


def _memory_report(recipe: Recipe, chosen: auto_settings.Plan, device: str, recipe_name: str) -> str:
    """The estimate's table; training on the CPU with no GPU to plan for, one line: a table of GPU terms, CUDA
    context and all, would describe a run that is not happening."""
    if device == "cpu" and recipe.train.device != "cuda" and chosen.budget.gib is None:
        return (f"Memory: training on the CPU; on a GPU this recipe would need {chosen.predicted_gib:.1f} GiB "
                f"(python -m qlora_trainer estimate --recipe {recipe_name} shows the terms)")
    return format_estimate(chosen.estimate, chosen.budget.gib)


def _plan(recipe: Recipe, options: RunOptions, launch: Launch | None, device: str,
          shape: ModelShape) -> auto_settings.Plan:
    """Plan the `auto` settings for this GPU: under the cap (--gpu-memory, else train.gpu_memory_gib) or the free
    memory. A dry run on a machine without a GPU plans for the GPU the recipe is written for."""
    cap = recipe.train.gpu_memory_gib
    source = f"--gpu-memory {cap:g}" if options.gpu_memory is not None else f"train.gpu_memory_gib {cap:g}" if cap else ""
    on_gpu = device == "cuda" or (options.dry_run and (cap is not None or recipe.train.device == "cuda"))
    budget = gpu_budget.run_budget(cap, source, device) if on_gpu else auto_settings.Budget(
        None, "training on the CPU: no GPU memory to plan for, so the safe defaults")
    return auto_settings.plan(recipe, shape, budget, on_gpu, launch)


def _build(prepared: PreparedRun, ctx: RunContext, callbacks: tuple):
    """Load the 4-bit base and build the trainer, in every process together."""
    recipe = prepared.recipe
    with distributed.together(ctx.launch):
        try:
            base = model_lib.load_base_model(recipe.model, recipe.quantization, ctx.device, ctx.launch)
            return build_trainer(recipe, base, prepared.tokenizer, prepared.data, ctx.run, ctx.device, ctx.launch,
                                 callbacks=callbacks)
        except ImportError as err:
            raise UserError(f"{first_line(err)}; install the missing package or change model.attn_implementation") from None


def _save_results(prepared: PreparedRun, ctx: RunContext, trainer, outcome: Outcome) -> dict:
    """Main process: the tokenizer beside the adapter, the loss plot and summary.json (last: its presence marks
    the run complete)."""
    recipe, run, name = prepared.recipe, ctx.run, ctx.options.recipe_name
    try:
        prepared.tokenizer.save_pretrained(run / "adapter")
        base_fingerprint.save_with_adapter(recipe.model, run, run / "adapter")
        apply_umask(run / "adapter")
        rows = read_metrics(run / "metrics.jsonl")
        plot_loss(rows, run / "loss.png", f"{name}: {recipe.model.name_or_path}")
        summary = summarise(prepared, ctx, trainer, outcome, rows)
        # PEFT's own card is an empty template naming the base by this machine's path.
        write_text_atomic(run / "adapter" / "README.md", adapter_card(recipe, name, summary))
        write_json_atomic(run / SUMMARY, summary)
    except OSError as err:
        raise _saving_failed(run, err) from None
    return summary


def _saving_failed(run: Path, err: OSError) -> TrainingFailed:
    return TrainingFailed(f"training finished but saving its results in {run} failed ({err.strerror or err}); the "
                          f"checkpoints in {run / CHECKPOINTS} are intact; free space, then: {_resume_command(run)}")


def check_launch(recipe: Recipe, micro_batch_size: int, launch: Launch) -> None:
    """What a multi-process launch needs from the recipe, at the planned micro-batch."""
    t, micro = recipe.train, micro_batch_size
    if t.global_batch_size is not None and t.global_batch_size % (micro * launch.world_size):
        raise UserError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                        f"x processes ({micro} x {launch.world_size}); set it to a multiple of "
                        f"{micro * launch.world_size}")
    if launch.strategy == "fsdp" and t.optimizer != "adamw_torch":
        raise UserError(f"train.optimizer {t.optimizer}: under FSDP a resumed run cannot restore a bitsandbytes "
                        "optimizer's state (FSDP cannot reshard its nested state); use --set train.optimizer=adamw_torch "
                        "(sharded across the GPUs, so its fp32 state costs little)")
    if launch.strategy == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "1":
        raise UserError("FSDP2 (fsdp_version: 2) is not supported with 4-bit weights yet: use fsdp_version: 1, as in "
                        "recipes/accelerate/fsdp-qlora.yaml")


def _resume_command(run: Path) -> str:
    args = f"-m qlora_trainer --recipe {run / 'recipe.yaml'} --output-dir {run} --resume"
    if distributed.current_launch().distributed:  # the launcher's own options are not ours to know
        return f"the same accelerate launch (or torchrun) options, then {args}"
    return f"python {args}"


# A resumed run may change how long it trains, not what it trains: these sections must match the saved recipe.
FIXED_ON_RESUME = ("model", "quantization", "lora", "data", "dpo", "orpo", "kto")


def _check_same_run(recipe: ResolvedRecipe, saved_path: Path) -> None:
    if not saved_path.is_file():
        return
    saved = read_saved_recipe(saved_path)
    current = recipe.model_dump(mode="json")
    method = saved.get("train", {}).get("method", "sft")
    if method != recipe.train.method:
        raise UserError(f"--resume: train.method is {recipe.train.method} but the run used {method}; resume with the "
                        f"run's own recipe: --recipe {saved_path}")
    for section in FIXED_ON_RESUME:
        used = saved.get(section) if isinstance(saved.get(section), dict) else {}
        for key, value in current[section].items():
            if key in used and used[key] != value:
                raise UserError(f"--resume: {section}.{key} is {value!r} but the run used {used[key]!r}; "
                                f"resume with the run's own recipe: --recipe {saved_path}")


def _run_guarded(trainer, guards: tuple[StopOnSignal, StopOnNonFinite], ctx: RunContext, prepared: PreparedRun):
    """trainer.train(), with every way it can stop early turned into one line that says what was kept."""
    stop_signal, stop_nonfinite = guards
    run, predicted, checkpoint = ctx.run, prepared.predicted, ctx.checkpoint
    resume = _resume_command(run)
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.cuda.OutOfMemoryError:
        peak = torch.cuda.max_memory_reserved() / GIB
        fixes = (fixes_that_fit(prepared.shape, predicted.settings, 0.9 * peak)
                 or ["a smaller train.seq_len or micro_batch_size"])
        raise TrainingFailed(f"CUDA out of memory at step {trainer.state.global_step}: peak {peak:.1f} GiB reserved, "
                             f"estimate was {predicted.total / GIB:.1f} GiB; try {', or '.join(fixes)}; "
                             f"checkpoints so far are in {run / CHECKPOINTS}") from None
    except OSError as err:
        failed = _write_failure(err, run, resume)
        if failed is None:
            raise  # a connection reset, a bug's bad path: the boundary reports it with its traceback saved
        raise failed from None
    finally:
        stop_signal.restore()
    # Both stops are agreed at each step end, so every process raises the same error; the main one prints it.
    if stop_nonfinite.bad_step is not None:
        last = latest_checkpoint(run)
        raise distributed.agreed(TrainingFailed(
            f"loss became non-finite at step {stop_nonfinite.bad_step}; the update was dropped and training stopped; "
            f"last good checkpoint: {last or 'none'}; try a lower train.learning_rate or train.max_grad_norm, then "
            "start again or --resume"))
    if stop_signal.received is not None:
        raise distributed.agreed(Interrupted(
            f"stopped by {signal.Signals(stop_signal.received).name} at step {trainer.state.global_step}; checkpoint "
            f"saved in {run / CHECKPOINTS}; continue with: {resume}"))
    return result


# What a full or read-only disk, a quota or lost permissions raise while checkpoints and metrics are written.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _write_failure(err: OSError, run: Path, resume: str) -> TrainingFailed | None:
    """The one line for a disk that refused a write, naming the path when it is not in the run (a full /tmp or
    cache disk is not fixed by freeing the run's); None for an OSError that is no such thing."""
    where = Path(str(err.filename)) if err.filename is not None else None
    inside = where is not None and where.resolve().is_relative_to(run.resolve())
    if err.errno not in WRITE_ERRNOS and not inside:
        return None
    place = f"write {where}" if where is not None and not inside else f"write in {run}"
    return TrainingFailed(f"cannot {place} ({err.strerror or err}); earlier checkpoints in {run / CHECKPOINTS} are "
                          f"intact; free space or fix permissions, then: {resume}")


def _open_run_dir(prepared: PreparedRun, options: RunOptions, hold: contextlib.ExitStack) -> RunContext:
    """Create the run directory with the resolved recipe and the estimate, noting the directories made for it;
    or, resuming, find the checkpoint and the files to rewrite once it has loaded (resume.py). The launch and
    device are the caller's to fill in."""
    recipe, chosen, run = prepared.recipe, prepared.plan, options.output_dir
    made = prepare_run_dir(run, options.resume, hold)
    header = f"# python -m qlora_trainer --recipe {run / 'recipe.yaml'}\n"
    if chosen.chosen:  # the saved values are concrete, so that a resume trains exactly as the run started
        header += f"# auto settings ({', '.join(chosen.chosen)}) were settled to: {chosen.describe()}\n"
    estimate_json = auto_settings.estimate_json(prepared.predicted, chosen)
    files = {"recipe.yaml": header + dump_recipe(recipe), "estimate.json": json.dumps(estimate_json, indent=2) + "\n"}
    ctx = RunContext(options, Launch(), "", run, made)
    if not options.resume:
        try:
            base_fingerprint.record(recipe.model, run)  # where the weights are on this machine already; else at the end
            for name, text in files.items():
                write_text_atomic(run / name, text)
        except BaseException:
            undo(run, made)  # a run that never began leaves nothing
            raise
        return ctx
    _check_same_run(recipe, run / "recipe.yaml")
    base_fingerprint.check(run, recipe.model, "--resume: the run")
    checkpoint = usable_checkpoint(run)
    if checkpoint is None:
        print(f"--resume: no complete checkpoint in {run / CHECKPOINTS}; starting from step 0")
    # The steps after the checkpoint will be logged again: drop their first rows.
    files["metrics.jsonl"] = resumed_metrics(run, int(checkpoint.name.split("-")[-1]) if checkpoint else 0)
    return dataclasses.replace(ctx, checkpoint=checkpoint, deferred=files)


def _evaluated_at(trainer, step: int) -> bool:
    """Whether an eval was logged at `step` (the same answer in every process: each keeps the log history)."""
    return any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)
