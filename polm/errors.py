"""One error type for everything a user can get wrong: the CLI prints it as one paragraph and
exits with code 2, never with a traceback."""


class PolmError(Exception):
    """A user-facing error: bad recipe, bad checkpoint, bad input. Its message says what was
    expected and how to fix it."""


def user_path(source: str):
    """``source`` as a local path, ``~`` expanded; a ``~user`` that names no user is a
    PolmError (pathlib raises a bare RuntimeError), found by the recipe fuzz."""
    from pathlib import Path

    try:
        return Path(source).expanduser()
    except RuntimeError:
        raise PolmError(
            f"{source!r}: {source.split('/')[0]!r} is no user's home directory on this machine."
        ) from None
