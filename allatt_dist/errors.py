"""User-facing errors: each is printed by the CLI as one line, with a non-zero exit.

Exit statuses (docs/training.md, "Errors"): 2 for what the user can fix in the input (`UserError`,
checked before work starts where possible), 1 for what the machine refused during the run
(`EnvironmentFailure`, and a plain `OSError` / `MemoryError`: a full disk, a file that cannot be
written, memory), 130 for Ctrl-C.
"""


class UserError(Exception):
    """A problem with the user's input (file, key, value); the message says what is allowed."""


class ConfigError(UserError):
    """A config file or override that does not validate."""


class DataError(UserError):
    """A missing, empty or unreadable corpus."""


class CheckpointError(UserError):
    """A missing, corrupt or mismatched model/checkpoint."""


class EnvironmentFailure(Exception):
    """The machine refused during the run (disk, memory, file system); exit status 1, not 2."""
