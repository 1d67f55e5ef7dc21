"""The errors a user can fix, and the exit codes the command line maps them to (see DESIGN.md)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_WONT_FIT = 3
EXIT_INTERRUPTED = 130

# Line breaks and other control characters in what a message quotes (a key, a value, a file name) would split the
# one error line or hide part of it: they are shown escaped, as Python writes them.
_ESCAPED = {code: repr(chr(code))[1:-1] for code in [*range(32), *range(127, 160), 0x2028, 0x2029]}


class UserError(Exception):
    """Bad input: the message names the file, line or key and the fix. Exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str):
        super().__init__(one_line(message))


class WontFitError(UserError):
    """The run is predicted not to fit the machine it would run on. Exit code 3; `--force` overrides."""

    exit_code = EXIT_WONT_FIT


class TrainingFailed(Exception):
    """A run that started but could not finish (non-finite loss, out of memory, disk full): one line saying what
    happened, what was kept, and what to try. Exit code 1."""

    exit_code = EXIT_FAILURE


class Interrupted(TrainingFailed):
    """SIGINT/SIGTERM: a checkpoint was saved and the message gives the resume command. Exit code 130."""

    exit_code = EXIT_INTERRUPTED


class InternalError(Exception):
    """An exception nobody anticipated (a bug, or a library failure not yet mapped to bad input), carried as text:
    its type and first line in the message, the whole traceback in `details`. Processes exchange errors by
    pickling them, and an arbitrary library exception may not survive that; this one does. Exit code 1."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details

    @classmethod
    def wrapping(cls, err: BaseException) -> "InternalError":
        import traceback

        return cls(f"{type(err).__name__}: {first_line(err)}", "".join(traceback.format_exception(err)))


def first_line(err: Exception) -> str:
    """The first line of an exception's message (or its type), for one-line error messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def one_line(text: str) -> str:
    """`text` with its line breaks and control characters escaped: what an error line may quote."""
    return text.translate(_ESCAPED)
