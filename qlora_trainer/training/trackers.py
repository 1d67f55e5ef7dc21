"""Experiment trackers (train.report_to) through transformers' own integrations: the same callbacks every
transformers user gets, checked up front so that a missing package is one line before anything loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qlora_trainer.errors import UserError

# tracker -> the module it needs (and the package that brings it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


def check_trackers(names: list[str]) -> None:
    """Every tracker asked for must be importable: transformers would otherwise fail when the trainer starts."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to: {name} needs the {package} package: pip install {package}, or remove "
                            f"{name} from train.report_to")


def report_to(names: list[str]) -> list[str]:
    """What transformers' `report_to` gets: TensorBoard is added by us (tensorboard_callback), so that its logs
    land in the run directory rather than under the checkpoints."""
    return [name for name in names if name != "tensorboard"]


def tensorboard_callback(names: list[str], run: Path):
    if "tensorboard" not in names:
        return None
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run / "tensorboard")))
