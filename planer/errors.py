"""The one exception type users see.

Every problem caused by the user's input (a bad path, an invalid arch.json, an
unknown preset) raises `PlanerError` with a one-line message naming the
problem and the fix; the CLI prints it and exits non-zero without a traceback.
"""


class PlanerError(Exception):
    """A problem with the user's input; the message says what to change."""
