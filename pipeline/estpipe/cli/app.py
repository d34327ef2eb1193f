"""The `estpipe` command line: one Typer app, one module per command.

`main()` turns a `UserError` into one line on stderr and its exit code (2; 3 for results that
could not be written after a run that did not converge; ESTPIPE_DEBUG=1 shows the traceback),
click's own usage errors (a bad option value, a missing or unknown option) into one such line with
exit code 2, and any other exception into exit code 1. While it runs, SIGINT, SIGTERM and SIGHUP
are handled by estpipe.interrupts (the previous handlers come back when it returns).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer
import typer.core

from estpipe import interrupts
from estpipe.errors import EXIT_INTERNAL, EXIT_USER, UserError, cli_flag, vocabulary

app = typer.Typer(
    name="estpipe",
    help="GMM estimation of logit choice models on large data, with dual-block derivatives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


COMMAND_NAMES: list[str] = []


def _register() -> None:
    from estpipe.cli import bench, estimate, inspect, load, report, run, simulate, submit
    from estpipe.cli.choices import Command

    for module in (simulate, load, inspect, estimate, report, bench, run, submit):
        app.command(module.NAME, cls=Command, help=module.__doc__, epilog=getattr(module, "EPILOG", None))(module.command)
        COMMAND_NAMES.append(module.NAME)


def _version(value: bool) -> None:
    if value:
        from estpipe import __version__

        print(f"estpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", help="Print the estpipe version and exit.", is_eager=True,
                                 callback=_version),
) -> None:
    pass


_register()


# Typer >= 0.25 carries its own copy of click (typer._click); older ones use click itself.
_click = getattr(typer.core, "_click", None) or importlib.import_module("click")
ClickException = _click.exceptions.ClickException
# click >= 8.2 raises it for a bare `estpipe` after printing the help; older click exits 0 itself.
NoArgsIsHelpError = getattr(_click.exceptions, "NoArgsIsHelpError", ())


def usage_error_line(exc, args: list[str]) -> str:
    """click's message (Typer would draw it in a box under the usage) as one line with the fix:
    where to read the command's options. args: the command line, for the command's name when
    click's error carries no context."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        command = ctx.command_path
    else:
        name = next((a for a in args if not a.startswith("-")), None)
        command = f"estpipe {name}" if name in COMMAND_NAMES else "estpipe"
    return f"{message}; see `{command} --help`"


def main(argv: list[str] | None = None) -> None:
    with interrupts.handled(), vocabulary(cli_flag):
        _main(argv)


def _main(argv: list[str] | None) -> None:
    debug = os.environ.get("ESTPIPE_DEBUG") == "1"
    try:
        # standalone_mode=False: click's usage errors come back here instead of being printed
        # (as multi-line boxes) and exited on inside Typer; --help and typer.Exit return a code.
        code = app(args=argv, prog_name="estpipe", standalone_mode=False)
    except NoArgsIsHelpError:
        sys.exit(EXIT_USER)  # the help is already printed; exit code 2, as click has it
    except ClickException as exc:
        if debug:
            traceback.print_exc()
        print(f"estpipe: error: {usage_error_line(exc, sys.argv[1:] if argv is None else list(argv))}", file=sys.stderr)
        sys.exit(EXIT_USER)
    except typer.Abort:
        print("estpipe: aborted", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)
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
    sys.exit(code if isinstance(code, int) else 0)
