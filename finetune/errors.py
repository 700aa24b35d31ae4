"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad input: a recipe, a data file, a path, a flag. The CLI prints the message and exits 2, no traceback.

    The message must stand alone: name the field, file or row, and say what to do about it.
    """


class RunStopped(UserError):
    """A run that stopped before its end: interrupted, diverged, or unable to write. The message says what is on
    disk and how to go on; the exit code is 130 for an interrupt (the shell's convention for Ctrl-C), else 2."""

    INTERRUPTED = 130

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
