"""The user errors of a run: one line on stderr and exit code 2, never a traceback (CLI.md).

Kept apart from the heavy modules so the command line can report them before torch loads.
"""


class UsageError(Exception):
    """Bad command line or input (a flag, a file, a save dir): exit code 2."""


class DataError(UsageError):
    """A missing or unreadable dataset: exit code 2."""
