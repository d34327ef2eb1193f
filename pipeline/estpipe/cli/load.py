"""`estpipe load` (not built yet)."""

from estpipe.errors import UserError

NAME = "load"


def command() -> None:
    raise UserError("estpipe load is not built yet")
