"""What a run hands from stage to stage (train.py): the options it was started with, what preparing settled
before the run directory exists, and where this process's run stands."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qlora_trainer.config.resolved_recipe import ResolvedRecipe
from qlora_trainer.dataset.data import Data
from qlora_trainer.distributed import Launch
from qlora_trainer.estimate.auto_settings import Plan
from qlora_trainer.estimate.memory import Estimate, ModelShape


@dataclass(frozen=True)
class RunOptions:
    recipe_name: str
    output_dir: Path
    resume: bool = False
    dry_run: bool = False
    force: bool = False
    gpu_memory: float | None = None  # --gpu-memory: caps the GPU memory and plans for it, as train.gpu_memory_gib


@dataclass(frozen=True)
class PreparedRun:
    """Everything settled before the run directory exists: the concrete recipe the run trains with, the model's
    shape, the plan and estimate for this launch, the rows and the tokenizer."""

    recipe: ResolvedRecipe
    shape: ModelShape
    plan: Plan
    predicted: Estimate  # for the resolved recipe (packing settled) and this launch
    data: Data
    tokenizer: object  # a transformers tokenizer


@dataclass(frozen=True)
class RunContext:
    """Where this process's run stands: how it was launched and on what, its directory, what that directory was
    made of (to undo), and on --resume the checkpoint and the files to rewrite once it has loaded (resume.py)."""

    options: RunOptions
    launch: Launch
    device: str
    run: Path
    made: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None
    deferred: dict[str, str] = field(default_factory=dict)
