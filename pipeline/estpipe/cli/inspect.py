"""`estpipe inspect` (not built yet)."""

from estpipe.errors import UserError

NAME = "inspect"


def command() -> None:
    raise UserError("estpipe inspect is not built yet")
