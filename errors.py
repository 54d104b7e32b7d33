"""The user errors of a run: one line on stderr and exit code 2, never a traceback (CLI.md).

Kept apart from the heavy modules so the command line can report them before torch loads.
"""


class UsageError(Exception):
    """Bad command line or input (a flag, a file, a save dir): exit code 2. `every_rank`: every
    process of a torchrun run finds the same error, so only rank 0 reports it."""

    def __init__(self, message: str = "", every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class DataError(UsageError):
    """A missing or unreadable dataset: exit code 2."""
