"""ResolvedRecipe -> SFTConfig (or a preference method's config, preference_trainer.py), and the TRL trainer that trains
a 4-bit base with it: the one place where recipe keys become TRL and transformers arguments."""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.config.resolved_recipe import ResolvedRecipe
from qlora_trainer.console import datasets_quiet
from qlora_trainer.dataset import formats
from qlora_trainer.distributed import Launch
from qlora_trainer.errors import UserError
from qlora_trainer.files.run_dir import CHECKPOINTS
from qlora_trainer.loading import model as model_lib
from qlora_trainer.training import preference_trainer, speed_levers, trackers
from qlora_trainer.training.adapter_start import peft_start
from qlora_trainer.training.metrics import MetricsLogger
from qlora_trainer.training.progress import ProgressLines
from qlora_trainer.training.sft_trainer import qlora_sft_trainer

# bitsandbytes pages optimizer state only in CUDA managed memory; on the CPU the same optimizer unpaged (it warns
# and falls back itself, once per parameter group; choosing it here says so once, in the plan).
CPU_OPTIMIZERS = {"paged_adamw_8bit": "adamw_bnb_8bit", "paged_adamw_32bit": "adamw_torch"}


def optimizer_for(name: str, device: str) -> str:
    return CPU_OPTIMIZERS.get(name, name) if device == "cpu" else name


def build_trainer(recipe: ResolvedRecipe, model, tokenizer, data, run: Path, device: str, launch: Launch = Launch(),
                  callbacks: tuple = ()):
    from transformers.trainer_callback import ProgressCallback

    speed_levers.apply_kernels(model, recipe.train.kernels)  # before PEFT wraps the projections the kernels call
    has_eval = data.eval is not None
    if recipe.train.method == "sft":
        trainer_class, args = qlora_sft_trainer(), sft_config(recipe, run, device, has_eval, launch)
        train_rows, eval_rows = data.train, data.eval
    else:
        trainer_class, args = preference_trainer.trainer_and_config(
            recipe, training_arguments(recipe, run, device, has_eval, launch))
        train_rows, eval_rows = preference_trainer.trainer_rows(recipe, data)
    model, peft_config = peft_start(model, recipe)
    tensorboard = trackers.tensorboard_callback(recipe.train.report_to, run)
    with datasets_quiet():  # TRL's tokenizing passes, several per split, each with its bar
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=eval_rows,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[MetricsLogger(run / "metrics.jsonl", perplexity=recipe.train.method == "sft"), *callbacks,
                       *([tensorboard] if tensorboard else [])],
        )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressLines)
    model_lib.set_adapter_dtype(trainer.model, recipe.lora)
    if trainer.is_fsdp_enabled:
        from peft.utils.other import fsdp_auto_wrap_policy

        # Each LoRA layer in its own FSDP unit: a flat parameter then holds only trainable or only frozen weights.
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    if recipe.train.compile:
        speed_levers.compile_decoder_layers(trainer.model)
    return trainer


def sft_config(recipe: ResolvedRecipe, run: Path, device: str, has_eval: bool, launch: Launch = Launch()):
    from trl import SFTConfig

    t, d = recipe.train, recipe.data
    if (t.packing or t.padding_free) and recipe.model.trust_remote_code:
        # transformers keeps packed rows apart (from position_ids) in its own sdpa/eager/flash attention; a model's
        # own code may not, and would then let rows attend to each other without any error.
        raise UserError("train.packing and train.padding_free need the model's transformers attention, and "
                        "model.trust_remote_code runs the model's own code; unset train.packing/train.padding_free")
    return SFTConfig(
        **training_arguments(recipe, run, device, has_eval, launch),
        activation_offloading=t.activation_offloading,
        # Rows longer than seq_len were counted (and with overlong: drop, left out) by data.fit_to_tokenizer; TRL
        # truncates the rest. TRL cannot truncate padding-free batches without packing: there overlong is drop.
        max_length=None if t.padding_free and not t.packing else t.seq_len,
        completion_only_loss=not d.train_on_prompt,
        # Conversations: loss on the assistant turns only, marked by the chat template's {% generation %} blocks.
        assistant_only_loss=not d.train_on_prompt and formats.get(d.format).assistant_turns,
        packing=t.packing,  # best-fit decreasing: whole rows per sequence, each attending only to itself
        padding_free=t.padding_free,
    )


def training_arguments(recipe: ResolvedRecipe, run: Path, device: str, has_eval: bool, launch: Launch = Launch()) -> dict:
    """The transformers TrainingArguments every method's TRL config takes, from the recipe."""
    t = recipe.train
    eval_steps = t.eval_steps or t.logging_steps * 10
    return dict(
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
        optim=optimizer_for(t.optimizer, device),
        activation_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs and is what PyTorch recommends. Under FSDP, whose
        # mixed precision keeps the adapters in fp32, its recomputation check fails after a sharded checkpoint
        # save (fp32 saved, bf16 recomputed): the reentrant variant, as PEFT's FSDP-QLoRA recipe uses.
        activation_checkpointing_kwargs={"use_reentrant": launch.strategy == "fsdp"},
        bf16=recipe.quantization.compute_dtype == "bfloat16",
        fp16=recipe.quantization.compute_dtype == "float16" and device == "cuda",
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
        report_to=trackers.report_to(t.report_to),
        run_name=run.name,  # what wandb, mlflow and trackio call the run
        project="qlora-trainer",  # trackio's project (transformers' default is "huggingface")
        dataloader_num_workers=0,
        # Every LoRA weight takes part in every step; searching the graph for unused ones costs time each step
        # and fails with non-reentrant checkpointing.
        ddp_find_unused_parameters=False,
    )
