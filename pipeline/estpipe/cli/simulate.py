"""Simulate choice data into a choice-data file (HDF5).

`--design logit` (the default) draws one choice per set from a logit model with true parameters
stored in the file (truth/params); dm = z - z_chosen with instruments z = x, then squares minus
one, pairwise products and cubes of x, up to M columns. `--design seed` makes the original
report's timing data (X ~ N(0,1), dm ~ U(0,1)), which has no estimate. `--cluster-size C` groups
contiguous sets into clusters of C sets; in the logit design each cluster shares a random shock to
the coefficients (utility shock sd 0.5), so that clustered standard errors matter.
`--design mixed-logit` draws the coefficients of the `--random` columns once per decision maker
(`--panel-size` sets each; the decision makers are stored), normal or lognormal, correlated with
`--correlated`; `--design nested-logit` draws from an RU2 nested logit with `--nests` contiguous
nests of the alternatives (the nests text is stored: pass it to `estimate --nests`). Every design
stores each row's alternative (a1..aJ) and the truth by name. The same seed gives the same
arrays, whatever the chunk size. A summary goes to stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from estpipe.cli.argv import option_argv
from estpipe.errors import UserError

NAME = "simulate"
EPILOG = ("Example: `estpipe simulate data.h5 --sets 100000 --alternatives 2:30 --params 20 --moments 40 --seed 1`; "
          "`estpipe simulate ml.h5 --design mixed-logit --random x2 --panel-size 5 --params 3 --moments 6 --alternatives 4`")


def parse_alternatives(text: str) -> tuple[int, int]:
    """'30' -> (30, 30); '2:30' -> (2, 30). Range checks are in estpipe.data.simulate."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            n = int(parts[0])
            return n, n
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise UserError(f"--alternatives {text!r}: expected a set size like 30 or a range like 2:30")


def simulate_argv(out, **arguments) -> list[str]:
    """The arguments of this command that make what simulate_choice_data(out, **arguments) makes
    (a batch script's `estpipe simulate`), in the order of `arguments`; `out` as given."""
    values = dict(arguments)
    if "alternatives" in values:
        lo, hi = values["alternatives"]
        values["alternatives"] = str(lo) if lo == hi else f"{lo}:{hi}"
    return [str(out)] + option_argv(values)


def command(
    out: Annotated[Path, typer.Argument(help="Output choice-data file (HDF5); written under a temporary name and renamed at the end.", dir_okay=False)],
    design: Annotated[str, typer.Option(help="{estpipe.data.simulate:DESIGNS}.")] = "logit",
    sets: Annotated[int, typer.Option(help="Number of choice sets.")] = 1000,
    alternatives: Annotated[str, typer.Option(help="Alternatives per set: a size like 30, or a range like 2:30 (drawn per set).")] = "30",
    params: Annotated[int, typer.Option(help="Number of covariates K (columns of X).")] = 20,
    moments: Annotated[int, typer.Option(help="Number of moments M (columns of dm), M >= K.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the random generators.")] = 0,
    cluster_size: Annotated[int | None, typer.Option("--cluster-size", help="Group contiguous sets into clusters of this many sets.")] = None,
    random: Annotated[str | None, typer.Option(help="mixed-logit: the random x columns (e.g. x1,x2 or x2:-lognormal) or their count (x1..xn); default 1.")] = None,
    correlated: Annotated[bool, typer.Option("--correlated", help="mixed-logit: correlated random coefficients (a Cholesky factor).")] = False,
    panel_size: Annotated[int | None, typer.Option("--panel-size", help="mixed-logit: sets per decision maker (their coefficients drawn once; the decision makers stored).")] = None,
    nests: Annotated[int | None, typer.Option(help="nested-logit: the number of contiguous nests of the alternatives (default 2).")] = None,
) -> None:
    from estpipe.data.simulate import simulate_choice_data

    lo_hi = parse_alternatives(alternatives)
    # SIGINT, SIGTERM and SIGHUP are estpipe.interrupts' (the temporary file is registered there).
    summary = simulate_choice_data(
        out, design=design, sets=sets, alternatives=lo_hi, params=params, moments=moments,
        seed=seed, cluster_size=cluster_size, random=random, correlated=correlated, panel_size=panel_size,
        nests=nests, progress=True,
    )
    print(f"estpipe: {summary.line()}", file=sys.stderr)
