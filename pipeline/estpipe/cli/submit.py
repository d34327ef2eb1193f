"""`estpipe submit` (not built yet)."""

from estpipe.errors import UserError

NAME = "submit"


def command() -> None:
    raise UserError("estpipe submit is not built yet")
