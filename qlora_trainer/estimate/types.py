"""The estimator's types: a model's shape, the settings an estimate is made for, the estimate itself, and the
memory budget a plan must fit. Every estimator module reads them; this one imports nothing from the estimator, so
the terms can be split across modules without importing one another for their types."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30


@dataclass
class Linear:
    name: str
    in_features: int
    out_features: int
    has_bias: bool
    quantized: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelShape:
    """What the estimator needs to know about a model, read off its meta-device instance."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    linears: list[Linear]
    other_params: int  # embeddings, untied lm_head, norms: every parameter outside the linear layers
    total_params: int
    norms_per_layer: int = 2  # hidden-size norms in one decoder layer (Gemma-2 has four)
    attn_softcapping: bool = False  # attention logits soft-capped with tanh (Gemma-2): eager saves the tanh too
    model_class: str = ""  # the class AutoModelForCausalLM builds for the config
    default_attention: str = "sdpa"  # what transformers picks when asked for nothing (`auto`)
    supported_attention: tuple[str, ...] = ("sdpa", "eager")  # what the class accepts when asked explicitly
    max_positions: int | None = None  # max_position_embeddings, where the config states it

    @property
    def quantized(self) -> list[Linear]:
        return [layer for layer in self.linears if layer.quantized]


@dataclass
class Settings:
    rank: int = 8
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.05
    use_dora: bool = False
    lora_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    seq_len: int = 2048
    batch_size: int = 1
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"  # the implementation transformers will use (resolved, never "auto")
    # Speed levers (issue 12), always resolved values here, never "auto":
    activation_offloading: bool = False  # TRL's activation offloading: saved tensors go to pinned CPU memory
    kernels: str = "none"  # "liger": liger-kernel's RMSNorm, RoPE and SwiGLU/GeGLU; "none": transformers' own
    padding_free: bool = False  # a micro-batch's rows concatenated into one row (position_ids keep them apart)
    packing: bool = False  # rows packed into full seq_len sequences (implies padding_free in TRL)
    strategy: str = "single"  # single | ddp | fsdp: the estimate is per GPU
    num_gpus: int = 1
    cpu_offload: bool = False  # FSDP only: sharded parameters, gradients and optimizer state live in CPU RAM
    method: str = "sft"  # train.method: dpo and orpo run pairs, dpo and kto a reference forward (method_memory.py)


@dataclass
class Estimate:
    model: str
    breakdown: dict[str, int]
    trainable_params: int
    total_params: int
    settings: Settings
    paged_bytes: int = 0
    cpu_offload_bytes: int = 0  # FSDP CPU offload: held in each process's CPU RAM instead of the GPU
    activation_offload_bytes: int = 0  # activation offloading: saved tensors held in pinned CPU RAM at the peak
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def all_params(self) -> int:
        """The base's parameters and the adapter's, as PEFT's "all params" counts them."""
        return self.total_params + self.trainable_params


@dataclass(frozen=True)
class Budget:
    """The memory a run may use, as nvidia-smi counts it (the CUDA context included), and where it came from;
    `host_gib` is the CPU RAM available for offloaded activations (None: not known, offloading is not limited)."""

    gib: float | None
    source: str
    host_gib: float | None = None
