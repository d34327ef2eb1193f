"""Errors that reach the user, with the exit codes DESIGN.md fixes.

A `UserError` is a mistake the user can fix (a bad file, column, option or spec): the CLI prints
its one-line message and exits with code 2. Anything else is an internal error (code 1).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable


class UserError(Exception):
    """A user mistake: one line naming what is wrong, where, and how to fix it. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_NOT_CONVERGED = 3


# -- the vocabulary messages name arguments in ---------------------------------------------------
# Core layers name what the user can change by its API argument (`max_iter`); only the front end
# knows how the user spells it. The command line sets its vocabulary for the duration of a
# command (`--max-iter`); a job spec's checker can set its own ("estimate.max_iter").
_vocabulary: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("estpipe_vocabulary", default=None)


def term(argument: str) -> str:
    """How the current front end spells the API argument `argument` (default: as it is)."""
    spell = _vocabulary.get()
    return argument if spell is None else spell(argument)


def cli_flag(argument: str) -> str:
    """`max_iter` -> `--max-iter`."""
    return "--" + argument.replace("_", "-")


@contextlib.contextmanager
def vocabulary(spell: Callable[[str], str]):
    """Messages made inside name arguments as `spell` spells them."""
    token = _vocabulary.set(spell)
    try:
        yield
    finally:
        _vocabulary.reset(token)
