"""What a run that fails leaves behind: nothing before its first optimizer step, its directory after it.

A new run that fails before its first step removes the directory it created (and the parents it made), whatever
the error, so the same --output-dir can be used again at once. A run that stepped, and any resumed run, keeps its
directory, and the error carries it (`run_dir`) so that the command line saves an unexpected error's traceback
there (error_log.py).
"""

from __future__ import annotations

from pathlib import Path

from qlora_trainer.files.made_dirs import undo


class KeptOnlyOnceStepped:
    """`with KeptOnlyOnceStepped(...) as attempt:` around the run; set `attempt.trainer` once it is built."""

    def __init__(self, run: Path, made: list[Path], resume: bool, is_main: bool):
        self.run, self.made, self.resume, self.is_main = run, made, resume, is_main
        self.trainer = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> bool:
        if error is None:
            return False
        if self.trainer is not None:
            end_progress_bar(self.trainer)
        stepped = self.trainer is not None and self.trainer.state.global_step > 0
        if self.resume or stepped:
            error.run_dir = self.run
        elif self.is_main:
            undo(self.run, self.made)
        return False


def end_progress_bar(trainer) -> None:
    """Close the Trainer's progress bar, which a failure leaves open mid-line: the error must be a line of its own."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None
