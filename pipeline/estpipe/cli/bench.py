"""`estpipe bench` (not built yet)."""

from estpipe.errors import UserError

NAME = "bench"


def command() -> None:
    raise UserError("estpipe bench is not built yet")
