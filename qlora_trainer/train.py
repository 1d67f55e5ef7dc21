"""Recipe -> SFTConfig + SFTTrainer, and one run from plan to summary.json.

The steps read from the top of `train()`: plan, run directory, model, data, trainer, train, save, summarise.
The libraries do the work; this module only wires them together and records what happened.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_trainer import auto_settings, base_fingerprint, distributed, gpu_budget, gpu_memory, model_checks, speed_levers
from qlora_trainer import model as model_lib
from qlora_trainer.distributed import Launch
from qlora_trainer.data import check_data_path, load_data
from qlora_trainer.sequence_fit import describe_data, fit_to_tokenizer
from qlora_trainer.errors import Interrupted, TrainingFailed, UserError, WontFitError, first_line
from qlora_trainer.exact_match import exact_match_accuracy
from qlora_trainer.failed_run import KeptOnlyOnceStepped
from qlora_trainer.made_dirs import missing_dirs, undo
from qlora_trainer.memory import estimate
from qlora_trainer.memory_report import check_fits, fixes_that_fit, format_estimate, settings_from_recipe, shape_for_model
from qlora_trainer.metrics import GIB, MetricsLogger, plot_loss, read_metrics
from qlora_trainer.recipe import Recipe, dump_recipe, launch_command, load_yaml
from qlora_trainer.resume import WriteWhenLoaded, resumed_metrics, usable_checkpoint
from qlora_trainer.safeguards import StopOnNonFinite, StopOnSignal
from qlora_trainer.sft_trainer import qlora_sft_trainer
from qlora_trainer.run_dir import CHECKPOINTS, SUMMARY, apply_umask, latest_checkpoint, prepare_run_dir, write_json_atomic, write_text_atomic


@dataclass
class RunOptions:
    recipe_name: str
    output_dir: Path
    resume: bool = False
    dry_run: bool = False
    force: bool = False
    gpu_memory: float | None = None  # --gpu-memory: caps the GPU memory and plans for it, as train.gpu_memory_gib


def pick_device(recipe: Recipe) -> str:
    return "cpu" if recipe.train.device == "cpu" else model_lib.default_device()


def check_device(recipe: Recipe, device: str, force: bool) -> None:
    if recipe.train.device == "cuda" and device != "cuda" and not force:
        raise WontFitError("train.device is cuda but no CUDA GPU is visible: a 4-bit model this size would take days "
                           "on the CPU; run on a GPU machine (or add --force to train on the CPU anyway)")


def describe_plan(recipe: Recipe, options: RunOptions, device: str, launch: Launch = Launch(),
                  chosen: auto_settings.Plan | None = None) -> str:
    t, lora, q = recipe.train, recipe.lora, recipe.quantization
    length = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    extras = "".join([", rsLoRA" if lora.use_rslora else "", ", DoRA" if lora.use_dora else ""])
    data = recipe.data.path + (f" (eval: {recipe.data.eval_path})" if recipe.data.eval_path else "")
    return "\n".join([
        f"qlora-trainer: recipe {options.recipe_name}",
        f"  model     {recipe.model.name_or_path}: 4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, "
        f"compute {q.compute_dtype}, {recipe.model.attn_implementation} attention{_attention_origin(chosen)}",
        f"  lora      r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {targets}{extras}, {lora.dtype} adapters",
        f"  data      {data}, format {recipe.data.format}",
        f"  training  {length}, {_batch_arithmetic(t, launch.world_size)} sequences/step, seq_len {t.seq_len}, lr {t.learning_rate:g} "
        f"{t.lr_scheduler}, {t.optimizer}",
        f"  speed     {_levers(t)}",
    ] + ([f"  auto      {chosen.describe()}"] if chosen is not None and chosen.chosen else []) + [
        f"  device    {device}, {launch.describe()}",
        f"  output    {options.output_dir}",
    ] + [f"  NOTE      {note}" for note in _launch_notes(recipe, options, launch)]
      + [f"  WARNING   {warning}" for warning in _security_warnings(recipe)])


def _attention_origin(chosen: auto_settings.Plan | None) -> str:
    return " (auto: transformers' choice for the model)" if chosen and "attn_implementation" in chosen.chosen else ""


def _launch_notes(recipe: Recipe, options: RunOptions, launch: Launch) -> list[str]:
    """Say so when a multi-GPU recipe is launched otherwise than it was written for (the estimate follows the
    launch). Any recipe may run under DDP: that needs no note."""
    d = recipe.distributed
    if d.strategy == "single" or (d.strategy, d.num_gpus, d.cpu_offload) == (launch.strategy, launch.world_size,
                                                                           launch.cpu_offload):
        return []
    written = f"{d.strategy} on {d.num_gpus} GPUs{' with CPU offload' if d.cpu_offload else ''}"
    return [f"this recipe is written for {written}: {launch_command(recipe, options.recipe_name)}"]


def _levers(t) -> str:
    def on(flag) -> str:
        return "auto" if flag == "auto" else "on" if flag else "off"

    return (f"checkpointing {on(t.gradient_checkpointing)}, activation offloading {on(t.activation_offloading)}, "
            f"kernels {t.kernels}, compile {on(t.compile)}, packing {on(t.packing)}, padding-free {on(t.padding_free)}")


def _batch_arithmetic(t, world_size: int) -> str:
    per_process = f"{t.micro_batch_size} x {t.accumulation_steps(world_size)} accumulation"
    total = t.micro_batch_size * t.accumulation_steps(world_size) * world_size
    return f"{per_process} x {world_size} processes = {total}" if world_size > 1 else f"{per_process} = {total}"


def _security_warnings(recipe: Recipe) -> list[str]:
    warnings = []
    if recipe.model.trust_remote_code:
        warnings.append(f"model.trust_remote_code is on: Python code from {recipe.model.name_or_path} will run")
    if recipe.model.allow_pickle_weights:
        warnings.append("model.allow_pickle_weights is on: pickle weights can run code when loaded")
    return warnings


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
    recipe, shape, predicted, chosen, data, tokenizer = prepared
    estimate_json = auto_settings.estimate_json(predicted, chosen)
    made = missing_dirs(options.output_dir)
    run, checkpoint, deferred = distributed.on_main(
        lambda: _open_run_dir(recipe, options, estimate_json, chosen, made), launch)
    with KeptOnlyOnceStepped(run, made, options.resume, launch.is_main) as attempt:
        return _train_in(options, launch, device, prepared, run, checkpoint, deferred, attempt)


def _train_in(options, launch, device, prepared, run, checkpoint, deferred, attempt) -> dict | None:
    """The run from loading the model to summary.json, in the run directory `_open_run_dir` made."""
    recipe, shape, predicted, chosen, data, tokenizer = prepared
    context_bytes = gpu_memory.context_bytes() if device == "cuda" else None

    torch.manual_seed(recipe.train.seed)
    guards = (StopOnSignal(), StopOnNonFinite())
    attempt.trainer = trainer = _build(recipe, launch, tokenizer, data, run, device,
                                       (*guards, WriteWhenLoaded(run, deferred)))
    outcome = Outcome(report=model_lib.parameter_report(trainer.model), plan=chosen)
    print(model_lib.format_parameter_report(outcome.report), flush=True)

    outcome.before = _exact_match(recipe, trainer, tokenizer, data, launch, "before training")
    started = time.perf_counter()
    outcome.result = _run_guarded(trainer, guards, checkpoint, run, predicted, shape)
    outcome.runtime = time.perf_counter() - started
    outcome.after = _exact_match(recipe, trainer, tokenizer, data, launch, "after training")
    if data.eval is not None and not _evaluated_at(trainer, trainer.state.global_step):
        trainer.evaluate()  # every process takes part; MetricsLogger appends the result to metrics.jsonl
    try:
        trainer.save_adapter(run / "adapter")  # under FSDP every process takes part in gathering it
    except OSError as err:
        raise _saving_failed(run, err) from None
    outcome.memory = distributed.gather(
        gpu_memory.peak_memory_report(predicted.total, _memory_sampler(trainer), context_bytes), launch)
    # DDP keeps the copies identical; a difference would mean the processes trained apart. FSDP holds shards.
    if launch.strategy != "fsdp":
        outcome.checksums = distributed.gather(model_lib.adapter_checksum(trainer.peft_model), launch)
    if outcome.checksums and len(set(outcome.checksums)) > 1:
        print(f"WARNING: the processes ended with different adapters ({outcome.checksums}); the main process's is saved")

    summary = distributed.on_main(
        lambda: _save_results(recipe, options, trainer, tokenizer, outcome, data, launch, run), launch)
    print(_describe_summary(summary, run))
    return summary if launch.is_main else None


def _prepare(recipe: Recipe, options: RunOptions, launch: Launch, device: str):
    """Everything that can fail on bad input, before the run directory exists: plan, estimate, data, tokenizer.
    Returns the recipe with its `auto` settings settled, which is what the run trains with and saves."""
    model_lib.resolve_model_path(recipe.model)  # a missing local model is named before anything else
    shape = shape_for_model(recipe.model.name_or_path, recipe.model.trust_remote_code)
    model_checks.check_lora_targets(recipe.lora.target_modules, shape)
    model_checks.check_seq_len(recipe.train.seq_len, shape)
    recipe, chosen = _settle_auto(recipe, options, launch, device, shape)
    check_launch(recipe, launch)
    print(describe_plan(recipe, options, device, launch, chosen), flush=True)
    predicted = estimate(shape, settings_from_recipe(recipe, launch))
    print(format_estimate(predicted, chosen.budget.gib), flush=True)
    check_data_path(recipe.data)
    if options.dry_run:
        print("Dry run: recipe and data paths are valid; stopping before loading weights.")
        return None
    check_device(recipe, device, options.force)
    speed_levers.check_levers(recipe.train, device)
    if device == "cuda":
        check_fits(predicted, shape, chosen.budget.gib, chosen.budget.source, options.force)
        if recipe.train.gpu_memory_gib is not None:
            gpu_budget.apply_cap(recipe.train.gpu_memory_gib)

    data = load_data(recipe.data, recipe.train.seed)  # before the run directory: bad data leaves nothing behind
    if recipe.eval.exact_match and not isinstance(data.eval[0].get("prompt"), str):
        raise UserError(f"eval.exact_match needs text prompt/completion rows (or alpaca); {data.source} is {data.format}")
    tokenizer = model_lib.load_tokenizer(recipe.model)
    model_checks.check_vocabulary(tokenizer, shape)
    data = fit_to_tokenizer(data, recipe.data, tokenizer, recipe.train.seq_len, recipe.model.name_or_path)
    recipe, notes = auto_settings.settle_packing(recipe, data.stats["train_mean_tokens"], device == "cuda",
                                                 chosen.attn_implementation)
    data.notes += notes
    print(describe_data(data), flush=True)
    predicted = estimate(shape, settings_from_recipe(recipe, launch))
    return recipe, shape, predicted, chosen, data, tokenizer


def _settle_auto(recipe: Recipe, options: RunOptions, launch: Launch, device: str, shape):
    """Plan the `auto` settings for this GPU: under the cap (--gpu-memory, else train.gpu_memory_gib) or the free
    memory. A dry run on a machine without a GPU plans for the GPU the recipe is written for."""
    if options.gpu_memory is not None:
        recipe = auto_settings.settle(recipe, gpu_memory_gib=options.gpu_memory)
    cap = recipe.train.gpu_memory_gib
    source = f"--gpu-memory {cap:g}" if options.gpu_memory is not None else f"train.gpu_memory_gib {cap:g}" if cap else ""
    on_gpu = device == "cuda" or (options.dry_run and (cap is not None or recipe.train.device == "cuda"))
    budget = gpu_budget.run_budget(cap, source, device) if on_gpu else auto_settings.Budget(
        None, "training on the CPU: micro-batch 1, checkpointing on, no offloading")
    chosen = auto_settings.plan(recipe, shape, budget, on_gpu, launch)
    return auto_settings.apply_plan(recipe, chosen), chosen


def _build(recipe, launch, tokenizer, data, run, device, callbacks):
    """Load the 4-bit base and build the trainer, in every process together."""
    with distributed.together(launch):
        try:
            base = model_lib.load_base_model(recipe.model, recipe.quantization, device, launch)
            return build_trainer(recipe, base, tokenizer, data, run, device, launch, callbacks=callbacks)
        except ImportError as err:
            raise UserError(f"{first_line(err)}; install the missing package or change model.attn_implementation") from None


@dataclass
class Outcome:
    """What a run measured, for summary.json: the same in every process but `memory` and `checksums`, gathered."""

    report: dict
    plan: auto_settings.Plan | None = None  # what the `auto` settings were settled to, and why
    before: dict | None = None
    after: dict | None = None
    result: object = None
    runtime: float = 0.0
    memory: list[dict] = field(default_factory=list)  # each process's peak GPU memory
    checksums: list[str] | None = None  # each process's adapter (DDP)


def _save_results(recipe, options, trainer, tokenizer, outcome: Outcome, data, launch, run) -> dict:
    """Main process: the tokenizer beside the adapter, the loss plot and summary.json (last: its presence marks
    the run complete)."""
    try:
        tokenizer.save_pretrained(run / "adapter")
        base_fingerprint.save_with_adapter(recipe.model, run, run / "adapter")
        apply_umask(run / "adapter")
        rows = read_metrics(run / "metrics.jsonl")
        plot_loss(rows, run / "loss.png", f"{options.recipe_name}: {recipe.model.name_or_path}")
        summary = _summary(recipe, options, trainer, outcome, rows, data, launch)
        write_json_atomic(run / SUMMARY, summary)
    except OSError as err:
        raise _saving_failed(run, err) from None
    return summary


def _saving_failed(run: Path, err: OSError) -> TrainingFailed:
    return TrainingFailed(f"training finished but saving its results in {run} failed ({err.strerror or err}); the "
                          f"checkpoints in {run / CHECKPOINTS} are intact; free space, then: {_resume_command(run)}")


def check_launch(recipe: Recipe, launch: Launch) -> None:
    """What a multi-process launch needs from the recipe."""
    t = recipe.train
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * launch.world_size):
        raise UserError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                        f"x processes ({t.micro_batch_size} x {launch.world_size}); set it to a multiple of "
                        f"{t.micro_batch_size * launch.world_size}")
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
FIXED_ON_RESUME = ("model", "quantization", "lora", "data")


def _check_same_run(recipe: Recipe, saved_path: Path) -> None:
    if not saved_path.is_file():
        return
    saved = load_yaml(saved_path.read_text(encoding="utf-8")) or {}
    current = recipe.model_dump(mode="json")
    for section in FIXED_ON_RESUME:
        for key, value in current[section].items():
            if key in saved.get(section, {}) and saved[section][key] != value:
                raise UserError(f"--resume: {section}.{key} is {value!r} but the run used {saved[section][key]!r}; "
                                f"resume with the run's own recipe: --recipe {saved_path}")


def _run_guarded(trainer, guards, checkpoint: Path | None, run: Path, predicted, shape):
    """trainer.train(), with every way it can stop early turned into one line that says what was kept."""
    stop_signal, stop_nonfinite = guards
    resume = _resume_command(run)
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.cuda.OutOfMemoryError:
        peak = torch.cuda.max_memory_reserved() / GIB
        fixes = fixes_that_fit(shape, predicted.settings, 0.9 * peak) or ["a smaller train.seq_len or micro_batch_size"]
        raise TrainingFailed(f"CUDA out of memory at step {trainer.state.global_step}: peak {peak:.1f} GiB reserved, "
                             f"estimate was {predicted.total / GIB:.1f} GiB; try {', or '.join(fixes)}; "
                             f"checkpoints so far are in {run / CHECKPOINTS}") from None
    except OSError as err:
        raise TrainingFailed(f"cannot write in {run} ({err.strerror or err}); earlier checkpoints in {run / CHECKPOINTS} "
                             f"are intact; free space or fix permissions, then: {resume}") from None
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


def _open_run_dir(recipe: Recipe, options: RunOptions, estimate_json: dict, chosen: auto_settings.Plan,
                  made: list[Path]) -> tuple[Path, Path | None, dict[str, str]]:
    """Create the run directory with the resolved recipe and the estimate; or, resuming, find the checkpoint and
    return the files to rewrite once it has loaded (resume.py)."""
    try:
        run = prepare_run_dir(options.output_dir, options.resume)
    except BaseException:
        if options.output_dir in made:  # refused after making it (unwritable): take away what it made
            undo(options.output_dir, made)
        raise
    header = f"# python -m qlora_trainer --recipe {run / 'recipe.yaml'}\n"
    if chosen.chosen:  # the saved values are concrete, so that a resume trains exactly as the run started
        header += f"# auto settings ({', '.join(chosen.chosen)}) were settled to: {chosen.describe()}\n"
    files = {"recipe.yaml": header + dump_recipe(recipe), "estimate.json": json.dumps(estimate_json, indent=2) + "\n"}
    if not options.resume:
        try:
            base_fingerprint.record(recipe.model, run)  # where the weights are on this machine already; else at the end
            for name, text in files.items():
                write_text_atomic(run / name, text)
        except BaseException:
            undo(run, made)  # a run that never began leaves nothing
            raise
        return run, None, {}
    _check_same_run(recipe, run / "recipe.yaml")
    base_fingerprint.check(run, recipe.model, "--resume: the run")
    checkpoint = usable_checkpoint(run)
    if checkpoint is None:
        print(f"--resume: no complete checkpoint in {run / CHECKPOINTS}; starting from step 0")
    # The steps after the checkpoint will be logged again: drop their first rows.
    files["metrics.jsonl"] = resumed_metrics(run, int(checkpoint.name.split("-")[-1]) if checkpoint else 0)
    return run, checkpoint, files


def build_trainer(recipe: Recipe, model, tokenizer, data, run: Path, device: str, launch: Launch = Launch(),
                  callbacks: tuple = ()):
    speed_levers.apply_kernels(model, recipe.train.kernels)  # before PEFT wraps the projections the kernels call
    trainer = qlora_sft_trainer()(
        model=model,
        args=sft_config(recipe, run, device, has_eval=data.eval is not None, launch=launch),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=model_lib.lora_config(recipe.lora),
        callbacks=[MetricsLogger(run / "metrics.jsonl"), *callbacks],
    )
    model_lib.set_adapter_dtype(trainer.model, recipe.lora)
    if trainer.is_fsdp_enabled:
        from peft.utils.other import fsdp_auto_wrap_policy

        # Each LoRA layer in its own FSDP unit: a flat parameter then holds only trainable or only frozen weights.
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    if recipe.train.compile:
        speed_levers.compile_decoder_layers(trainer.model)
    return trainer


def sft_config(recipe: Recipe, run: Path, device: str, has_eval: bool, launch: Launch = Launch()):
    from trl import SFTConfig

    t, d = recipe.train, recipe.data
    eval_steps = t.eval_steps or t.logging_steps * 10
    if (t.packing is True or t.padding_free is True) and recipe.model.trust_remote_code:
        # transformers keeps packed rows apart (from position_ids) in its own sdpa/eager/flash attention; a model's
        # own code may not, and would then let rows attend to each other without any error.
        raise UserError("train.packing and train.padding_free need the model's transformers attention, and "
                        "model.trust_remote_code runs the model's own code; unset train.packing/train.padding_free")
    return SFTConfig(
        output_dir=str(run / CHECKPOINTS),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.accumulation_steps(launch.world_size),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a share of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        activation_checkpointing=t.gradient_checkpointing,
        # A recipe built without the planner (tests, tools) may still say auto here: auto unplanned is off, as on the CPU.
        activation_offloading=t.activation_offloading is True,
        # Non-reentrant checkpointing works with frozen inputs and is what PyTorch recommends. Under FSDP, whose
        # mixed precision keeps the adapters in fp32, its recomputation check fails after a sharded checkpoint
        # save (fp32 saved, bf16 recomputed): the reentrant variant, as PEFT's FSDP-QLoRA recipe uses.
        activation_checkpointing_kwargs={"use_reentrant": launch.strategy == "fsdp"},
        bf16=recipe.quantization.compute_dtype == "bfloat16",
        fp16=recipe.quantization.compute_dtype == "float16" and device == "cuda",
        # Rows longer than seq_len were counted (and with overlong: drop, left out) by data.fit_to_tokenizer; TRL
        # truncates the rest. TRL cannot truncate padding-free batches without packing: there overlong is drop.
        max_length=None if t.padding_free is True and t.packing is not True else t.seq_len,
        completion_only_loss=not d.train_on_prompt,
        # Conversations: loss on the assistant turns only, marked by the chat template's {% generation %} blocks.
        assistant_only_loss=not d.train_on_prompt and d.format == "messages",
        packing=t.packing is True,  # best-fit decreasing: whole rows per sequence, each attending only to itself
        padding_free=t.padding_free is True,
        logging_steps=t.logging_steps,
        logging_first_step=True,  # the first loss shows where training started
        logging_nan_inf_filter=False,  # a NaN loss must show up (and stop the run), not be averaged away
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=device == "cpu",
        report_to=[],
        dataloader_num_workers=0,
        # Every LoRA weight takes part in every step; searching the graph for unused ones costs time each step
        # and fails with non-reentrant checkpointing.
        ddp_find_unused_parameters=False,
    )


def _evaluated_at(trainer, step: int) -> bool:
    """Whether an eval was logged at `step` (the same answer in every process: each keeps the log history)."""
    return any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)


def _exact_match(recipe: Recipe, trainer, tokenizer, data, launch: Launch, when: str) -> dict | None:
    """Exact match on the eval prompts, each process completing its share of them."""
    if not recipe.eval.exact_match:
        return None
    if launch.strategy == "fsdp":  # each process holds a shard of the model: generating would gather it whole
        print(f"Held-out exact match {when}: skipped under FSDP; run `generate` on the adapter instead", flush=True)
        return None
    rows = data.eval.select(range(min(recipe.eval.max_samples, len(data.eval))))
    share = rows.shard(num_shards=launch.world_size, index=launch.rank, contiguous=True)
    parts = distributed.gather(
        exact_match_accuracy(trainer.peft_model, tokenizer, share, len(share), recipe.eval.max_new_tokens), launch)
    result = combine_exact_match(parts)
    print(f"Held-out exact match {when}: {result['accuracy']:.1%} ({result['correct']}/{result['total']})", flush=True)
    return result


def combine_exact_match(parts: list[dict]) -> dict:
    correct, total = sum(p["correct"] for p in parts), sum(p["total"] for p in parts)
    examples = [e for p in parts for e in p["examples"]][:3]
    return {"accuracy": correct / total, "correct": correct, "total": total, "examples": examples}


def _memory_sampler(trainer):
    """The GPU memory sampler the metrics callback ran during training (None on CPU)."""
    loggers = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsLogger)]
    return loggers[0].memory if loggers else None


def _summary(recipe, options, trainer, outcome: Outcome, rows, data, launch) -> dict:
    """Tokens are counted over all processes (TRL gathers them); memory and adapter checksums per process."""
    runtime, memory = outcome.runtime, outcome.memory
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    final_eval = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})
    tokens = max((r.get("tokens") or 0 for r in rows), default=0)
    return {
        "recipe": options.recipe_name,
        "model": recipe.model.name_or_path,
        "device": "cuda" if memory[0]["measured"] is not None else "cpu",
        "processes": launch.world_size,
        "strategy": launch.strategy,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "mean_train_loss": outcome.result.training_loss,
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": final_eval.get("eval_perplexity"),
        "runtime_s": round(runtime, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None,
        "tokens_per_s_per_process": round(tokens / runtime / launch.world_size, 1) if runtime > 0 else None,
        **outcome.report,
        "data_format": data.format,
        "data": data.stats,
        # accelerate's FSDP mixed precision keeps trainable weights in fp32 (and autocasts the compute).
        "adapter_dtype": "float32" if launch.strategy == "fsdp" else recipe.lora.dtype,
        "frozen_dtypes": sorted(set(model_lib.frozen_dtypes(trainer.model).values())),
        "exact_match_before": outcome.before and outcome.before["accuracy"],
        "exact_match_after": outcome.after and outcome.after["accuracy"],
        "exact_match_examples": outcome.after and outcome.after["examples"],
        "auto_settings": outcome.plan.to_json() if outcome.plan else None,
        "levers": {k: getattr(recipe.train, k) for k in ("micro_batch_size", "gradient_checkpointing",
                                                         "activation_offloading", "kernels", "compile", "packing",
                                                         "padding_free", "gpu_memory_gib")},
        "peak_memory_gib": memory[0],  # the main process's GPU
        "peak_memory_gib_per_process": memory,
        "adapter_sha256_per_process": outcome.checksums,
    }


def _describe_summary(summary: dict, run: Path) -> str:
    lines = [f"Done in {summary['runtime_s']:.0f}s: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> "
             f"{summary['final_loss']:.3f}" if summary["first_loss"] is not None else f"Done: {summary['steps']} steps"]
    if summary["eval_loss"] is not None:
        lines.append(f"  eval loss {summary['eval_loss']:.3f}")
    if summary["exact_match_after"] is not None:
        lines.append(f"  held-out exact match {summary['exact_match_before']:.1%} -> {summary['exact_match_after']:.1%}")
    lines.append(f"  adapter   {run / 'adapter'}")
    lines.append(f"  metrics   {run / 'metrics.jsonl'}, plot {run / 'loss.png'}, summary {run / SUMMARY}")
    return "\n".join(lines)
