"""The `estpipe` command line: one Typer app, one module per command.

`main()` turns a `UserError` into one line on stderr and its exit code (2; 3 for results that
could not be written after a run that did not converge; ESTPIPE_DEBUG=1 shows the traceback), and
any other exception into exit code 1. While it runs, SIGINT, SIGTERM and SIGHUP are handled by
estpipe.interrupts (the previous handlers come back when it returns).
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from estpipe import interrupts
from estpipe.errors import EXIT_INTERNAL, UserError

app = typer.Typer(
    name="estpipe",
    help="GMM estimation of logit choice models on large data, with dual-block derivatives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _register() -> None:
    from estpipe.cli import bench, estimate, inspect, load, run, simulate, submit

    for module in (simulate, load, inspect, estimate, bench, run, submit):
        app.command(module.NAME, help=module.__doc__, epilog=getattr(module, "EPILOG", None))(module.command)


_register()


def main(argv: list[str] | None = None) -> None:
    with interrupts.handled():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    debug = os.environ.get("ESTPIPE_DEBUG") == "1"
    try:
        app(args=argv, prog_name="estpipe")
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"estpipe: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # an internal error: say so, keep the traceback behind ESTPIPE_DEBUG
        if debug:
            traceback.print_exc()
        print(
            f"estpipe: internal error: {type(exc).__name__}: {exc} (run with ESTPIPE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERNAL)
