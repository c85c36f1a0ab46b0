"""User-facing errors: each is printed by the CLI as one line, with a non-zero exit.

Exit statuses (docs/training.md, "Errors"): 2 for what the user can fix in the input (`UserError`,
checked before work starts where possible), 1 for what the machine refused during the run
(`EnvironmentFailure`, and a plain `OSError` / `MemoryError`: a full disk, a file that cannot be
written, memory), 130 for Ctrl-C.

`Problem` is one validation error, whoever found it (pydantic or model/checks.py); recipe.format_problem
words it as the one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


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


@dataclass(frozen=True)
class Problem:
    """One validation error, whoever found it (pydantic, or a check that needs the model code: model/checks.py):
    where (`loc`, the key's path), what (`msg`), and the offending value when pydantic names one."""

    loc: tuple = ()
    msg: str = ""
    type: str = "value_error"
    input: Any = None
    has_input: bool = False

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.loc)

    def within(self, label: str) -> str:
        """One line under `label` (a searched sample's problem: "tune.space: model.x: ...")."""
        return f"{label}: {self.key + ': ' if self.key else ''}{self.msg}"

    def under(self, *prefix: str) -> Problem:
        return Problem(tuple(prefix) + self.loc, self.msg, self.type, self.input, self.has_input)


def first_problem(err: ValidationError) -> Problem:
    """The first error pydantic reports, as a Problem (its message without pydantic's "Value error, ")."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    return Problem(tuple(first["loc"]), msg, first["type"], first.get("input"), "input" in first)


def yaml_problem(err: Exception) -> str:
    """A YAML parse error as "(line N): what", the line 1-based, for the one-line messages of recipe and
    runtime-env files."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark else ""
    return f"{where}: {getattr(err, 'problem', None) or err}"
