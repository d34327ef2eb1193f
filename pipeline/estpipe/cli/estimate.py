"""Estimate a logit choice model by two-step GMM on a choice-data file.

Each partition of the data is read once by the process (or dask worker) that evaluates it and
stays there; an evaluation returns only the additive sums. Step 1 uses W = I, step 2 (default)
W = S(b1)^-1; standard errors at the final estimate (clustered when the file has `cluster`), the
J test after step 2 when M > K. A table goes to stdout (`--json`: the results JSON), progress to
stderr. Exit codes: 0 converged, 3 not converged (results still written), 2 a user error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer

from estpipe.cli.argv import option_argv

NAME = "estimate"
EPILOG = ("Example: `estpipe simulate data.h5 --sets 20000 && estpipe estimate data.h5 --workers 2 "
          "--out results.json --checkpoint run.ckpt --resume`")

_BACKEND = "Back end"
_GMM = "GMM and optimizer"
_OUT = "Output"
_MODEL = "Model"


def command(
    data: Annotated[Path, typer.Argument(help="A choice-data file (HDF5) made by `estpipe simulate` or `estpipe load`.")],
    workers: Annotated[int, typer.Option(help="1: in-process (no cluster, BLAS on every core); N > 1: a local dask cluster of N worker processes (or N batch-job workers with --jobqueue).", min=1, rich_help_panel=_BACKEND)] = 1,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler, e.g. tcp://10.0.0.1:8786.", rich_help_panel=_BACKEND)] = None,
    scheduler_file: Annotated[Optional[str], typer.Option("--scheduler-file", help="Scheduler file of an existing dask cluster (dask scheduler --scheduler-file).", rich_help_panel=_BACKEND)] = None,
    jobqueue: Annotated[Optional[str], typer.Option(help="Start --workers N dask workers as batch jobs of this batch system: {estpipe.execution.jobqueue:KINDS}.", rich_help_panel=_BACKEND)] = None,
    partitions: Annotated[Optional[int], typer.Option(help="Contiguous partitions of the sets, balanced by rows (default: 1 per worker, 1 in-process).", min=1, rich_help_panel=_BACKEND)] = None,
    connect_timeout: Annotated[float, typer.Option("--connect-timeout", help="Seconds to wait for a scheduler or batch-job workers.", rich_help_panel=_BACKEND)] = 30.0,
    dashboard: Annotated[bool, typer.Option("--dashboard", help="Serve the dask dashboard (needs `pip install \"estpipe[dashboard]\"`): with --workers N on 127.0.0.1 at a free port, its URL on stderr; with --scheduler, --scheduler-file or --jobqueue, the scheduler's with an ssh-tunnel hint. Off by default.", rich_help_panel=_BACKEND)] = False,
    estimator: Annotated[str, typer.Option(help="{estpipe.estimation.estimators:ESTIMATORS}; mle needs the chosen rows (--steps does not apply; --optimizer takes the mle optimizers).", rich_help_panel=_GMM)] = "gmm",
    model: Annotated[str, typer.Option(help="{estpipe.models:MODELS}; or a model class in your own file: my_models.py:BoxCoxCost; or a model a package installs (entry point group estpipe.models).", rich_help_panel=_MODEL)] = "logit",
    random: Annotated[Optional[str], typer.Option(help="mixed-logit: the x columns with random coefficients, comma-separated, each normal or with :lognormal or :-lognormal (a fixed sign), e.g. time,cost:-lognormal.", rich_help_panel=_MODEL)] = None,
    correlated: Annotated[bool, typer.Option("--correlated", help="mixed-logit: correlated random coefficients (a Cholesky factor).", rich_help_panel=_MODEL)] = False,
    nests: Annotated[Optional[str], typer.Option(help="nested-logit: the nests, e.g. \"public=train,bus; private=car\" (alternatives in no nest are their own).", rich_help_panel=_MODEL)] = None,
    draws: Annotated[Optional[int], typer.Option(help="mixed-logit: draws per decision maker (default 200).", min=1, rich_help_panel=_MODEL)] = None,
    draws_kind: Annotated[Optional[str], typer.Option("--draws-kind", help="mixed-logit: {estpipe.models.draws:DRAW_KINDS} (default sobol).", rich_help_panel=_MODEL)] = None,
    draws_seed: Annotated[Optional[int], typer.Option("--draws-seed", help="mixed-logit: seed of the draws (default 0).", rich_help_panel=_MODEL)] = None,
    panel: Annotated[bool, typer.Option("--panel", help="mixed-logit: one draw of the coefficients per decision maker for all their sets (needs the file's panel units; the default when it has them).", rich_help_panel=_MODEL)] = False,
    optimizer: Annotated[Optional[str], typer.Option(help="gmm: {estpipe.estimation.optimizers:OPTIMIZERS}; default gauss-newton. mle: {estpipe.estimation.mle:MLE_OPTIMIZERS}; default bfgs.", rich_help_panel=_GMM)] = None,
    derivatives: Annotated[str, typer.Option(help="{estpipe.kernel.derivatives:DERIVATIVES}.", rich_help_panel=_GMM)] = "dual",
    steps: Annotated[int, typer.Option(help="1: W = I only; 2: then W = S(b1)^-1 (efficient).", rich_help_panel=_GMM)] = 2,
    start: Annotated[Optional[str], typer.Option(help="Start vector, comma-separated (default: the model's, zeros for logit).", rich_help_panel=_GMM)] = None,
    tol: Annotated[float, typer.Option(help="xtol and ftol of gauss-newton, gtol of bfgs and l-bfgs-b.", rich_help_panel=_GMM)] = 1e-10,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Iterations per GMM step.", min=1, rich_help_panel=_GMM)] = 200,
    no_cluster: Annotated[bool, typer.Option("--no-cluster", help="Ignore the file's clusters (sets independent).", rich_help_panel=_GMM)] = False,
    se: Annotated[Optional[str], typer.Option("--se", help="mle: the standard errors reported: robust (the default; clustered with clusters or panel units), classical ((-H)^-1) or bhhh (inverse OPG).", rich_help_panel=_GMM)] = None,
    out: Annotated[Optional[str], typer.Option(help="Write the results JSON here (atomically).", rich_help_panel=_OUT)] = None,
    report: Annotated[Optional[str], typer.Option(help="Write the HTML report of the results here at the end (needs estpipe[report]).", rich_help_panel=_OUT)] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Write a checkpoint (JSON) here after every accepted iteration.", rich_help_panel=_OUT)] = None,
    resume: Annotated[bool, typer.Option(help="Continue from --checkpoint when it exists (else start fresh).", rich_help_panel=_OUT)] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the results JSON on stdout instead of the table.", rich_help_panel=_OUT)] = False,
) -> None:
    from estpipe.cli.reporters import run_estimate
    from estpipe.orchestration import EstimateOptions

    options = EstimateOptions(
        workers=workers, scheduler=scheduler, scheduler_file=scheduler_file, jobqueue=jobqueue, partitions=partitions,
        estimator=estimator, model=model, random=random, correlated=correlated, nests=nests, draws=draws, draws_kind=draws_kind,
        draws_seed=draws_seed, panel=panel, optimizer=optimizer, derivatives=derivatives, steps=steps, start=start, tol=tol,
        max_iter=max_iter, no_cluster=no_cluster, se=se, out=out, report=report, checkpoint=checkpoint, resume=resume, json=json,
        connect_timeout=connect_timeout, dashboard=dashboard,
    )
    code = run_estimate(data, options)
    if code:
        raise typer.Exit(code)


def estimate_argv(options, names: Iterable[str]) -> list[str]:
    """The options of this command that set the EstimateOptions fields `names` to their values in
    `options`, in that order (a batch script's `estpipe estimate`: what its job spec fixes)."""
    return option_argv({name: getattr(options, name) for name in names})
