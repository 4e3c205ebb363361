"""User-facing errors: one line that says what went wrong and what to do about it."""


class RepqError(Exception):
    """A user mistake (bad input, wrong checkpoint, missing data). The CLI prints it without a traceback."""
