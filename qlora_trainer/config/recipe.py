"""The typed recipe: its sections and fields, their ranges, and the rules that tie them together.

Every field is documented once, here. Reading a recipe from YAML, `--set` overrides and the one-line report of
every problem: recipe_files.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qlora_trainer.files.given_paths import unusable

DEMO_MODEL_PREFIX = "demo:"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _not_blank(value: str | None) -> str | None:
    # An unset shell variable gives an empty path, which Path() would read as the current directory; a path the OS
    # cannot use at all (too long, a symlink loop) would fail later with a bare errno.
    if value is not None and not value.strip():
        raise ValueError("is empty; give a path or a hub id (an unset shell variable?)")
    problem = unusable(value) if value is not None else None
    if problem is not None:
        raise ValueError(f"{value}: {problem}")
    return value


class ModelSection(_Section):
    name_or_path: str = Field(description="Hub id, local directory, or `demo:tiny-llama` (built locally).")
    revision: str | None = Field(None, description="Hub branch, tag or commit to load.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model repository.")
    allow_pickle_weights: bool = Field(
        False, description="Also load pickle (.bin) weights, which can run code when unpickled; safetensors only by default."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; `auto`: what transformers picks for the model (sdpa, which avoids the "
        "seq_len^2 attention matrix, where the model supports it; eager for Gemma-2). The run's recipe.yaml records it."
    )
    adapter: str | None = Field(
        None, description="A finished run directory (RUN) or adapter directory (DIR) to continue training instead of "
        "starting a new adapter; its LoRA settings are used. For dpo and kto the reference is this adapter, frozen."
    )

    @field_validator("name_or_path", "adapter")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return _not_blank(value)


class QuantizationSection(_Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (the QLoRA paper's NF4).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.37 bit/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the dequantized matmuls and of the frozen embeddings, lm_head and norms."
    )


class LoraSection(_Section):
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` (every linear layer except lm_head) or a list of module names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r); helps at large ranks.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); slower, sometimes better.")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Dtype of the trainable adapter weights (the QLoRA paper trains them in bf16)."
    )


class DataSection(_Section):
    path: str = Field(description="Local .jsonl/.json/.csv/.parquet file or directory, or a hub dataset id.")
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text", "preference", "kto"] = Field(
        "auto", description="Row shape; `auto` detects it from the columns (the saved recipe.yaml records what was found)."
    )
    columns: dict[str, str] = Field(
        {}, description="Our field name -> the dataset's column, e.g. {prompt: question, completion: answer}."
    )
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to train on.")
    eval_path: str | None = Field(None, description="Separate file or hub id for evaluation rows.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the training rows held out for eval when no eval_path.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens (default: completion only).")
    chat_template: Literal["chatml", "alpaca"] | None = Field(
        None, description="Template for conversational rows; default: the tokenizer's own (a base model without one needs this)."
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Rows longer than train.seq_len tokens: cut at seq_len, or leave out. Counted either way."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="A row that is not valid JSON or lacks its fields: stop naming it, or skip and count it."
    )
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="With on_bad_rows: skip, stop when more than this share is bad.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N training rows (quick trials).")

    @field_validator("path", "eval_path")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return _not_blank(value)

    @model_validator(mode="after")
    def _check_data_options(self) -> DataSection:
        unknown = sorted(set(self.columns) - set(COLUMN_FIELDS))
        if unknown:
            raise ValueError(f"data.columns: unknown field {', '.join(unknown)}; the fields are {', '.join(COLUMN_FIELDS)}")
        return self


# The row fields data.columns can map to dataset columns.
COLUMN_FIELDS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text",
                 "chosen", "rejected", "label")


AUTO = "auto"


# Training methods: supervised fine-tuning, and the preference methods TRL runs over a PEFT model.
METHODS = ("sft", "dpo", "orpo", "kto")
PREFERENCE_METHODS = ("dpo", "orpo", "kto")


class TrainSection(_Section):
    method: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft", description="sft: learn the answers; dpo/orpo: learn to prefer `chosen` over `rejected` answers; kto: "
        "learn from answers labelled desirable or not. The method's own keys are in the section of its name."
    )
    seq_len: int = Field(2048, gt=0, description="Longest sequence in tokens; longer rows are truncated.")
    micro_batch_size: int | Literal["auto"] = Field(
        AUTO, description="Sequences per forward pass on one device; `auto`: the largest that fits the GPU's memory "
        "(1 on the CPU or without a known budget)."
    )
    global_batch_size: int | None = Field(
        None, gt=0, description="Sequences per optimizer step; gradient accumulation is derived from it when set."
    )
    gradient_accumulation_steps: int = Field(
        16, gt=0, description="Micro-batches per optimizer step when global_batch_size is unset (with an `auto` "
        "micro-batch, the global batch is then this many sequences)."
    )
    max_steps: int = Field(-1, description="Optimizer steps; -1 trains for `epochs` instead.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is -1.")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapters.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping (the QLoRA paper uses 0.3).")
    optimizer: Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_bnb_8bit", "adamw_torch"] = Field(
        "paged_adamw_8bit", description="Optimizer; paged ones spill state to CPU RAM instead of failing on spikes."
    )
    packing: bool | Literal["auto"] = Field(
        AUTO, description="Pack several rows into each seq_len sequence (TRL best-fit packing, no cross-row attention); "
        "`auto`: on a GPU when the rows average at most half of seq_len, off on the CPU."
    )
    padding_free: bool | Literal["auto"] = Field(
        AUTO, description="Concatenate a batch's rows without padding (implied by packing); needs data.overlong: drop "
        "without packing; `auto`: with packing on a GPU."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        AUTO, description="Recompute activations in backward: much less memory, ~30% slower; `auto`: off where the "
        "GPU has room (on on the CPU or without a known budget)."
    )
    activation_offloading: bool | Literal["auto"] = Field(
        AUTO, description="Move saved activations to CPU RAM during forward (TRL, CUDA only): ~24% less memory at "
        "micro-batch 4 for ~0.5% speed; `auto`: on only where nothing fits without it."
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        AUTO, description="liger: liger-kernel's fused RMSNorm, RoPE and SwiGLU/GeGLU (CUDA only); `auto`: liger on a "
        "CUDA GPU for the model types liger supports, none elsewhere. TRL's fused LM head is kept either way."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer as one region (CUDA only); off until the speed benchmark "
        "shows a gain on your GPU."
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Cap this process's GPU memory at N GiB (as nvidia-smi counts it) "
        "and plan the `auto` settings for N: proves an 8, 12 or 24 GB card on a bigger one. Default: the free memory."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers that also get every logged step, through "
        "transformers' own integrations; each needs its package (pip install tensorboard, wandb, mlflow or trackio). "
        "TensorBoard writes to the run's tensorboard/; the others follow their own settings (WANDB_PROJECT, "
        "MLFLOW_TRACKING_URI, TRACKIO_DIR...) and are named after the run."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss and speed every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps (default: at logging_steps x 10).")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout (0 to 2^32-1, "
                      "the range numpy accepts).")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="`cuda` stops with a message on a machine without a CUDA GPU instead of crawling on CPU."
    )

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _positive_or_auto(cls, value):
        if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"must be a positive integer or auto (got {value!r})")

    @field_validator("packing", "padding_free", "gradient_checkpointing", "activation_offloading", mode="before")
    @classmethod
    def _bool_or_auto(cls, value):
        if value == AUTO or isinstance(value, bool):
            return value
        raise ValueError(f"must be true, false or auto (got {value!r})")

    def global_batch(self, world_size: int = 1) -> int:
        """Sequences per optimizer step over all processes; with an `auto` micro-batch it is fixed before the
        micro-batch is chosen, so that choosing never changes what one step trains on."""
        if self.global_batch_size is not None:
            return self.global_batch_size
        micro = 1 if self.micro_batch_size == AUTO else self.micro_batch_size
        return micro * self.gradient_accumulation_steps * world_size

    def accumulation_for(self, micro_batch_size: int, world_size: int = 1) -> int:
        """Micro-batches per optimizer step in each process, at this micro-batch (the planned one, before the
        recipe is resolved)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        return self.global_batch_size // (micro_batch_size * world_size)

    @model_validator(mode="after")
    def _global_batch_divides(self) -> TrainSection:
        if (self.global_batch_size is not None and self.micro_batch_size != AUTO
                and self.global_batch_size % self.micro_batch_size):
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"train.max_steps must be a positive number of steps or -1 for epochs (got {self.max_steps})")
        return self


class DpoSection(_Section):
    """TRL's DPOTrainer. The reference is the base model (the adapter disabled), or the adapter of model.adapter."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (higher: less).")
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                       "apo_down", "sigmoid_norm"] = Field(
        "sigmoid", description="TRL's DPO loss: sigmoid is the DPO paper's; ipo, hinge, robust and the others as TRL "
        "documents them.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Share of pairs assumed mislabelled (robust).")


class OrpoSection(_Section):
    """TRL's ORPOTrainer (trl.experimental): the SFT loss on `chosen` plus an odds-ratio term; no reference model."""

    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (lambda in the ORPO paper).")


class KtoSection(_Section):
    """TRL's KTOTrainer: unpaired rows labelled desirable or not (preference pairs are split into two such rows)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (higher: less).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto estimates a KL term across each micro-batch (needs micro_batch_size 2 or more).")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of desirable rows.")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of undesirable rows.")


METHOD_SECTIONS = {"dpo": DpoSection, "orpo": OrpoSection, "kto": KtoSection}


class EvalSection(_Section):
    exact_match: bool = Field(
        False, description="Before and after training, greedily complete the eval prompts and report exact-match accuracy."
    )
    max_samples: int = Field(200, gt=0, description="Eval rows used for exact match.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens generated per prompt for exact match.")


class ExportSection(_Section):
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="Dtype of the merged export.")


class DistributedSection(_Section):
    """The launch a recipe is written for. `estimate` and `recipes` show per-GPU memory for it; a run follows how
    it was actually launched (accelerate's environment) and says in its plan when that differs."""

    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single", description="single: one GPU; ddp: the 4-bit base on every GPU; fsdp: weights and states sharded."
    )
    num_gpus: int = Field(1, gt=0, description="GPUs (processes) the recipe is written for.")
    cpu_offload: bool = Field(False, description="FSDP: keep sharded weights and optimizer state in CPU RAM (slower, less VRAM).")
    accelerate_config: str | None = Field(
        None, description="accelerate config to launch with: a file in recipes/accelerate/ (e.g. fsdp-qlora.yaml) or a path."
    )

    @field_validator("accelerate_config")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        return _not_blank(value)

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSection:
        if self.strategy == "single" and self.num_gpus != 1:
            raise ValueError("distributed.num_gpus above 1 needs distributed.strategy ddp or fsdp")
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("distributed.cpu_offload needs distributed.strategy: fsdp")
        if self.strategy != "single" and self.accelerate_config is None:
            raise ValueError(f"distributed.strategy {self.strategy} needs distributed.accelerate_config "
                             "(e.g. fsdp-qlora.yaml from recipes/accelerate/)")
        return self


class Recipe(_Section):
    """What the user wrote, `auto` values and all; planning turns it into a ResolvedRecipe (resolved_recipe.py)."""

    description: str = Field("", description="One line shown by `qlora-trainer recipes`.")
    model: ModelSection
    quantization: QuantizationSection = QuantizationSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    dpo: DpoSection = DpoSection()
    orpo: OrpoSection = OrpoSection()
    kto: KtoSection = KtoSection()
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    distributed: DistributedSection = DistributedSection()

    def replaced(self, section: str, **values) -> Recipe:
        """This recipe with these keys of `section` set (a command-line override), validated again."""
        raw = self.model_dump(mode="json")
        raw[section].update(values)
        return type(self).model_validate(raw)

    @model_validator(mode="after")
    def _sections_agree(self) -> Recipe:
        if self.eval.exact_match and self.data.eval_path is None and self.data.eval_fraction == 0:
            raise ValueError("eval.exact_match needs eval rows: set data.eval_path or data.eval_fraction")
        if self.train.padding_free is True and self.train.packing is not True and self.data.overlong != "drop":
            raise ValueError("train.padding_free without train.packing needs data.overlong: drop (TRL cannot truncate "
                             "padding-free batches); or set train.packing: true")
        method_problem = self._method_problem()
        if method_problem:
            raise ValueError(method_problem)
        return self

    def _method_problem(self) -> str | None:
        """What train.method needs from the other sections."""
        method, t = self.train.method, self.train
        for name, section in METHOD_SECTIONS.items():
            # Compared as values: a resolved recipe's sections are frozen subclasses of these.
            if name != method and getattr(self, name).model_dump() != section().model_dump():
                return f"the {name} section is set but train.method is {method}; set train.method: {name} or remove it"
        sft_formats, preference_formats = ("preference", "kto"), {"dpo": ("preference",), "orpo": ("preference",),
                                                                   "kto": ("preference", "kto")}
        if method == "sft" and self.data.format in sft_formats:
            return (f"data.format {self.data.format} holds preference rows; set train.method: dpo, orpo or kto "
                    "(kto for labelled rows)")
        if method == "sft":
            return None
        if self.data.format not in ("auto",) + preference_formats[method]:
            return (f"train.method {method} needs {' or '.join(preference_formats[method])} rows, not data.format "
                    f"{self.data.format}; set data.format: auto")
        if self.eval.exact_match:
            return (f"eval.exact_match is for sft runs; a {method} run reports held-out preference accuracy and "
                    "reward margin instead: remove eval.exact_match")
        if t.packing is True or t.padding_free is True:
            return f"train.packing and train.padding_free are for sft rows; remove them for train.method {method}"
        if method == "kto" and self.kto.loss_type == "kto" and (t.micro_batch_size == 1 or t.global_batch() < 2):
            return ("kto.loss_type kto estimates its KL term across each micro-batch: train.micro_batch_size must be "
                    "2 or more (or auto, with a global batch of 2 or more)")
        return None
