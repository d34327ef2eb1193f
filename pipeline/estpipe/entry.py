"""The `estpipe` command's entry point (also `python -m estpipe`): signal handling first, then
the command line.

The handlers of estpipe.interrupts go in before typer, numpy, h5py or dask are imported, so that
SIGINT, SIGTERM and SIGHUP end the process cleanly from its first moment (an interrupt during the
imports is otherwise a KeyboardInterrupt traceback). Nothing here runs on `import estpipe`.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from estpipe import interrupts

    interrupts.install()
    from estpipe.cli.app import main as cli_main

    cli_main(argv)
