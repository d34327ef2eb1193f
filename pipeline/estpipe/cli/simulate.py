"""`estpipe simulate` (not built yet)."""

from estpipe.errors import UserError

NAME = "simulate"


def command() -> None:
    raise UserError("estpipe simulate is not built yet")
