"""What the libraries print that tells a user nothing, kept off the console.

Each entry is one known message, matched exactly, with the reason it is noise; anything else the libraries say
still reaches the user.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

# (category, message regex), each with why it is noise for our runs
QUIET_WARNINGS = (
    # TRL 1.16 calls the deprecated name; transformers says so once per run, and the user can do nothing about it.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)

# Loggers whose messages at WARNING and below are noise: bitsandbytes' CPU backend tries to fetch a faster kernel
# from the Hugging Face hub at import on CPUs with AVX512-BF16, and logs a warning when it cannot; its own kernel
# is used then, with the same results.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_libraries() -> None:
    """Install the filters above; called once by the CLI before any library loads."""
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def datasets_quiet():
    """datasets' per-operation progress bars and log lines, off for the block: reading a local file or TRL's
    tokenizing passes (five bars per split) take moments and would only bury our own lines."""
    from datasets.utils import logging as datasets_logging

    verbosity, bars_on = datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    if bars_on:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars_on:
            datasets_logging.enable_progress_bar()
