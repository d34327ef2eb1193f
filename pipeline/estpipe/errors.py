"""Errors that reach the user, with the exit codes DESIGN.md fixes.

A `UserError` is a mistake the user can fix (a bad file, column, option or spec): the CLI prints
its one-line message and exits with code 2. Anything else is an internal error (code 1).
"""

from __future__ import annotations


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
