"""Convert long-format CSV or Parquet (one row per available alternative) to a choice-data file.

Rows of a set must be contiguous, and so must the sets of a cluster. X gets the `--x` columns;
dm = z - z of the chosen row, with instruments `--z` (default: the x columns), or `--dm` columns
are taken as given. `--alt-col C` stores each row's alternative (codes into the sorted levels of
C, numbers numerically, text lexically; the names in the file), which nested logit needs; with
`--asc` it also appends one 0/1 constant per level of C except the base level (`--asc-base`,
default the first level) to X and to z (with `--z` too: a constant is its own instrument). `--panel-col P` stores each set's
decision maker: one value per set, each decision maker's sets contiguous (sort by P) and, with
`--cluster-col`, inside one cluster; mixed logit draws its coefficients once per decision maker,
and the standard errors treat decision makers as the independent observations. A set with a single alternative carries no information: it is
dropped, with a note on stderr (the count and the first set id) and the count in the provenance.
The file is read in batches, so memory does not grow with it. Bad input: one line naming the file,
the line or set id and the fix; exit code 2; no output file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from estpipe.cli.argv import option_argv
from estpipe.text import count

NAME = "load"
EPILOG = (
    "Example: `estpipe load data/modechoice.csv modechoice.h5 --set-col individual "
    "--choice-col choice --x gc,ttme --alt-col mode --asc`"
)


def load_argv(input, out, **arguments) -> list[str]:
    """The arguments of this command that convert as load_choice_data(input, out, **arguments)
    does (a batch script's `estpipe load`); `input` and `out` as given."""
    return [str(input), str(out)] + option_argv(arguments)


def command(
    input: Annotated[Path, typer.Argument(metavar="INPUT", help="Long-format input: .csv (also .csv.gz) or .parquet.", show_default=False)],
    out: Annotated[Path, typer.Argument(metavar="OUT.h5", help="The choice-data file to write (HDF5).", show_default=False)],
    set_col: Annotated[str, typer.Option("--set-col", help="Column with the choice-set id (integers or text).", show_default=False)],
    choice_col: Annotated[str, typer.Option("--choice-col", help="Column with 1 for the chosen alternative, 0 otherwise.", show_default=False)],
    x: Annotated[str, typer.Option("--x", help="Covariate columns, comma-separated: X and the parameters.", show_default=False)],
    z: Annotated[Optional[str], typer.Option("--z", help="Instrument columns (default: the x columns); dm = z - z of the chosen row.")] = None,
    dm: Annotated[Optional[str], typer.Option("--dm", help="Moment columns taken as given (instead of --z).")] = None,
    alt_col: Annotated[Optional[str], typer.Option("--alt-col", help="Column naming the alternative: stored per row (nested logit needs it), and the levels of --asc.")] = None,
    asc: Annotated[bool, typer.Option("--asc", help="Add alternative-specific constants, one per level of --alt-col but the base.")] = False,
    asc_base: Annotated[Optional[str], typer.Option("--asc-base", help="Base level of --alt-col (default: the first level).")] = None,
    cluster_col: Annotated[Optional[str], typer.Option("--cluster-col", help="Cluster id column (integers or text) for clustered errors.")] = None,
    panel_col: Annotated[Optional[str], typer.Option("--panel-col", help="Decision-maker (panel unit) id column: one value per set, each unit's sets contiguous.")] = None,
) -> None:
    from estpipe.data.load import load_choice_data

    summary = load_choice_data(
        input,
        out,
        set_col=set_col,
        choice_col=choice_col,
        x=x,
        z=z,
        dm=dm,
        alt_col=alt_col,
        asc=asc,
        asc_base=asc_base,
        cluster_col=cluster_col,
        panel_col=panel_col,
    )
    for note in summary.notes:
        print(f"estpipe: note: {note}", file=sys.stderr)
    clusters = f", {count(summary.n_clusters, 'cluster')}" if summary.n_clusters is not None else ""
    if summary.n_units is not None:
        clusters += f", {count(summary.n_units, 'decision maker')}"
    if summary.alt_names is not None:
        clusters += f", {count(len(summary.alt_names), 'alternative')} ({', '.join(summary.alt_names)})"
    print(
        f"wrote {summary.output}: {count(summary.n_sets, 'set')}, {summary.n_rows} rows{clusters}, "
        f"K = {summary.K} ({', '.join(summary.param_names)}), M = {summary.M}; "
        f"{summary.rows_read} rows read in {summary.seconds:.2f} s ({summary.rows_per_second:,.0f} rows/s)"
    )
