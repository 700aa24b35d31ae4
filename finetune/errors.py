"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad input: a recipe, a data file, a path, a flag. The CLI prints the message and exits 2, no traceback.

    The message must stand alone: name the field, file or row, and say what to do about it.
    """
