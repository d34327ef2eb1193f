"""`estpipe estimate` (not built yet)."""

from estpipe.errors import UserError

NAME = "estimate"


def command() -> None:
    raise UserError("estpipe estimate is not built yet")
