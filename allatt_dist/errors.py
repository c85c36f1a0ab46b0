"""User-facing errors: each is printed by the CLI as one line, with a non-zero exit."""


class UserError(Exception):
    """A problem with the user's input (file, key, value); the message says what is allowed."""


class ConfigError(UserError):
    """A config file or override that does not validate."""


class DataError(UserError):
    """A missing, empty or unreadable corpus."""


class CheckpointError(UserError):
    """A missing, corrupt or mismatched model/checkpoint."""
