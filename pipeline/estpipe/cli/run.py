"""`estpipe run` (not built yet)."""

from estpipe.errors import UserError

NAME = "run"


def command() -> None:
    raise UserError("estpipe run is not built yet")
