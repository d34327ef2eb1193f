"""Option values as command-line arguments, for the estpipe commands that batch scripts run.

Each command module turns its own values into arguments (cli.estimate.estimate_argv,
cli.simulate.simulate_argv, cli.load.load_argv) with `option_argv`, and tests read them back
through the command, so a script says exactly what the values say.
"""

from __future__ import annotations

from typing import Mapping

from estpipe.errors import cli_flag


def option_argv(values: Mapping[str, object]) -> list[str]:
    """`--name value` for each API argument, in order (flags as errors.cli_flag spells them): a
    true flag alone, a false or None value left out (every such option's default), a list or
    tuple comma-separated, a float by repr (it reads back exactly)."""
    argv: list[str] = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        if value is True:
            argv.append(cli_flag(name))
        elif isinstance(value, (list, tuple)):
            argv += [cli_flag(name), ",".join(map(_word, value))]
        else:
            argv += [cli_flag(name), _word(value)]
    return argv


def _word(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)
