"""One error type for everything a user can get wrong: the CLI prints it as one paragraph and
exits with code 2, never with a traceback."""


class PolmError(Exception):
    """A user-facing error: bad recipe, bad checkpoint, bad input. Its message says what was
    expected and how to fix it."""
