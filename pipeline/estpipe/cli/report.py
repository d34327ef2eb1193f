"""Write the HTML report of a results file (from `estpipe estimate --out`): the estimates and their
intervals (with the truth on simulated data), the convergence of every step, the fit of each
moment condition (overidentified GMM) and the J test, the likelihood statistics (MLE), the data and
the run. One self-contained file (plots embedded): it opens from a cluster's shared disk. Needs
matplotlib (`pip install "estpipe[report]"`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

NAME = "report"
EPILOG = "Example: `estpipe estimate data.h5 --out results.json && estpipe report results.json --out report.html`"


def command(
    results: Annotated[Path, typer.Argument(help="A results file (JSON) written by `estpipe estimate --out`.")],
    out: Annotated[Optional[Path], typer.Option(help="The HTML file to write (default: RESULTS with .html).")] = None,
) -> None:
    from estpipe.errors import UserError
    from estpipe.outputs import check_writable, write_error
    from estpipe.report import write_report

    if not results.exists():
        raise UserError(f"{results}: no such file; give the results file of `estpipe estimate --out`")
    try:
        data = json.loads(results.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{results}: not a results file (not JSON: {' '.join(str(exc).split())}); give the file "
                        "`estpipe estimate --out` wrote") from None
    if not isinstance(data, dict):
        raise UserError(f"{results}: not a results file (JSON, but not an object); give the file `estpipe estimate --out` wrote")
    target = out if out is not None else results.with_suffix(".html")
    check_writable(target, "--out")
    try:
        write_report(data, target)
    except UserError as exc:
        raise UserError(f"{results}: {exc}") from None
    except OSError as exc:
        raise write_error(target, exc) from None
    typer.echo(str(target))
