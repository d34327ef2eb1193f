"""`estimate(path, options) -> Results`: the whole of `estpipe estimate`, as a Python function.

The orchestration around the pure estimator (estimation/gmm.py): check the options and the
output paths; read the file's facts once (ChoiceProblem); resume from a checkpoint; start or reach
the back end (which loads every partition once, where it stays); run the estimator, writing a
checkpoint after every accepted iteration; assemble the results and write the results file.
Progress goes to a Reporter (the CLI's prints to stderr; the CLI also owns the exit codes).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from estpipe.data.problem import ChoiceProblem, read_problem
from estpipe.errors import EXIT_NOT_CONVERGED, EXIT_USER, UserError, term
from estpipe.estimation.gmm import GmmSettings, Reporter, estimate_gmm, logit_start
from estpipe.estimation.mle import MleSettings, check_chosen, estimate_mle, simulated_start
from estpipe.estimation.results import Results, Telemetry
from estpipe.execution import start_backend
from estpipe.execution.planning import default_partitions, plan_partitions, unit_ids
from estpipe.kernel.engine import gradient_rule
from estpipe.models.spec import ModelSpec
from estpipe.models import get_model
from estpipe.orchestration.checkpoint import Checkpoint, load_checkpoint
from estpipe.orchestration.options import EstimateOptions
from estpipe.outputs import check_writable, write_error, write_json_atomic
from estpipe.text import count


def _check_output_paths(options: EstimateOptions) -> None:
    """Each output file can be written (a probe file in its folder), before any work."""
    for argument in ("out", "checkpoint", "report"):
        p = getattr(options, argument)
        if p is not None:
            check_writable(p, term(argument))
    if options.report is not None:
        from estpipe.report import _pyplot

        _pyplot()  # matplotlib missing: one line now, not after the run


class ResultsNotWritten(UserError):
    """The estimation finished but its results file could not be written. `results` holds them
    (the CLI prints them before the error line); the exit code is 3 when the run did not
    converge, else 2."""

    def __init__(self, message: str, results: Results):
        super().__init__(message)
        self.results = results
        self.exit_code = EXIT_NOT_CONVERGED if not results.converged else EXIT_USER


def _cap_workers(options: EstimateOptions, n_sets: int, cluster, log, unit: str | None = None) -> EstimateOptions:
    """At most one worker per partition the file can have (a partition is at least one set, or
    one of the units `cluster` (n_sets,) gives: clusters, or decision makers): surplus workers
    would hold nothing but still cost a process each. Capped with a note rather than refused:
    the run is the same with fewer. unit: the name of one unit in the note (default cluster or set)."""
    if options.scheduler or options.scheduler_file or options.workers <= 1:
        return options
    most = int(len(np.unique(cluster))) if cluster is not None else n_sets
    if options.workers <= most:
        return options
    unit = unit or ("cluster" if cluster is not None else "set")
    log(f"note: {term('workers')} {options.workers} is more than the {most} partition{'s' if most != 1 else ''} this file can "
        f"have (one {unit} each); starting {most} worker{'s' if most != 1 else ''}")
    return replace(options, workers=most)


def _versions(blas: list[dict], workers: int) -> dict:
    from importlib.metadata import version

    import scipy

    from estpipe import __version__

    libs = sorted({(b["library"], b["version"]) for r in blas for b in r["blas"]}, key=str)
    threads = [b["threads"] for r in blas for b in r["blas"]]
    return {
        "estpipe": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "scipy": scipy.__version__, "dask": version("dask"),
        "blas": {"libraries": [{"library": a, "version": v} for a, v in libs],
                 "threads_per_worker": max(threads) if threads else None,
                 "workers": [{"pid": r["pid"], "worker": r.get("worker"), "threads": [b["threads"] for b in r["blas"]]} for r in blas]},
    }


class _CheckpointWriter(Reporter):
    """The run's reporter, plus a checkpoint written (atomically) for every state the estimator
    hands on. A checkpoint that cannot be written is one warning, and the run goes on: the last
    one written, if any, stays valid."""

    def __init__(self, inner: Reporter, path: str | None, fingerprint: str, options: dict):
        self.inner, self.path, self.fingerprint, self.options = inner, path, fingerprint, options
        self.failed = False

    def log(self, message: str) -> None:
        self.inner.log(message)

    def iteration(self, record) -> None:
        self.inner.iteration(record)

    def checkpoint(self, state) -> None:  # a GmmState or an MleState
        if not self.path:
            return
        try:
            Checkpoint(fingerprint=self.fingerprint, options=self.options, state=state).save(self.path)
        except OSError as exc:
            if not self.failed:
                self.inner.log(f"warning: {write_error(self.path, exc)}; going on without a new checkpoint, so a "
                               "resumed run would start from the last one written")
            self.failed = True


def _start(problem: ChoiceProblem, model, options: EstimateOptions) -> np.ndarray:
    P = model.n_params(problem.K)
    names = model.param_names(problem.x_names)
    if options.estimator == "mle":
        check_chosen(problem)
    if problem.M < P and options.estimator == "gmm":
        more = (" (a mixed logit's variances need instruments beyond x, e.g. squares and interactions of the random "
                "x: estpipe simulate --design mixed-logit writes them)" if model.name == "mixed-logit" else "")
        raise UserError(f"{problem.path}: M = {count(problem.M, 'moment')} for {count(P, 'parameter')} of model "
                        f"{model.name}; GMM needs at least as many moments as parameters: add instruments "
                        f"(estpipe load --z) or drop covariates{more}")
    if options.start is None:
        return np.asarray(model.start(problem.K), dtype=np.float64)
    if len(options.start) != P:
        raise UserError(f"{term('start')} has {count(len(options.start), 'value')}, but model {options.model} on "
                        f"{problem.path} has {count(P, 'parameter')} ({', '.join(names[:6])}{', ...' if P > 6 else ''}); "
                        f"give {P} comma-separated numbers")
    return np.array(options.start, dtype=np.float64)


def estimate(path: str | os.PathLike, options: EstimateOptions | None = None, *, reporter: Reporter | None = None) -> Results:
    """Estimate the model on the choice-data file at `path` with `options`. See DESIGN.md.

    Raises UserError for every user mistake before anything is written. Writes options.out and
    options.checkpoint when given. A run that does not converge returns Results with
    converged=False (the CLI's exit code 3). When options.out cannot be written at the end, raises
    ResultsNotWritten, which carries the results; a checkpoint that cannot be written is reported
    through `reporter` and the run goes on."""
    options = options or EstimateOptions()
    reporter = reporter or Reporter()
    options.validate()
    _check_output_paths(options)
    t_start = time.perf_counter()
    problem = read_problem(path)
    spec = ModelSpec.of(options.model, **options.model_options())
    model = spec.build(problem)
    x0 = _start(problem, model, options)
    clustered = problem.has_cluster and not options.no_cluster
    # what changes the estimate: the options, and the contents of a user's model file
    result_options = options.result_options() | ({"model_file": spec.digest} if spec.digest else {})

    ckpt = None
    if options.checkpoint and options.resume:
        ckpt = load_checkpoint(options.checkpoint, problem.fingerprint, result_options, str(path))
        reporter.log(f"resuming from {options.checkpoint}: step {ckpt.step}, {count(ckpt.evaluations, 'evaluation')} so far"
                     if ckpt else f"no checkpoint at {options.checkpoint} yet: starting fresh")
    checkpoint_existed = bool(options.checkpoint) and Path(options.checkpoint).exists()
    options = _cap_workers(options, problem.n_sets, unit_ids(problem), reporter.log,
                           "cluster" if problem.has_cluster else ("decision maker" if problem.has_panel else "set"))

    def plan(n_workers: int):
        # the back end calls this once it knows its workers (an existing cluster's, once connected)
        return plan_partitions(problem.offsets, options.partitions or default_partitions(n_workers), unit_ids(problem))

    evaluator = start_backend(problem, options, plan, reporter.log, model=spec)
    partitions = evaluator.partitions
    try:
        reporter.log(f"{count(problem.n_sets, 'set')}, {problem.n_rows} rows, K = {problem.K}, M = {problem.M}; "
                     f"{evaluator.description}; {count(len(partitions), 'partition')}")
        rule = gradient_rule(model, options.derivatives)
        if options.derivatives == "adjoint" and rule.startswith("forward"):
            reporter.log(f"derivatives adjoint: {rule}")
        blas = evaluator.blas()
        settings = GmmSettings(optimizer=options.optimizer, derivatives=options.derivatives, steps=options.steps,
                               tol=options.tol, max_iter=options.max_iter)
        writer = _CheckpointWriter(reporter, options.checkpoint, problem.fingerprint, result_options)
        if options.start is None and ckpt is None and options.estimator == "gmm":
            x0 = logit_start(evaluator, problem, model, get_model("logit"), settings, clustered, reporter) \
                if model.logit_start else x0
        try:
            if options.estimator == "mle":
                mle_settings = MleSettings(tol=options.tol, max_iter=options.max_iter, optimizer=options.optimizer,
                                           se=options.se)
                if options.start is None and ckpt is None and getattr(model, "simulated", False):
                    x0 = simulated_start(evaluator, problem, model, mle_settings, clustered, reporter)
                est = estimate_mle(evaluator, problem, model, mle_settings, x0, clustered, reporter=writer,
                                   state=None if ckpt is None else ckpt.state)
            else:
                est = estimate_gmm(evaluator, problem, model, settings, x0, clustered,
                                   state=None if ckpt is None else ckpt.state, reporter=writer)
        except UserError:
            if options.checkpoint and not checkpoint_existed and Path(options.checkpoint).exists():
                os.unlink(options.checkpoint)
            raise
        stats = evaluator.stats
        telemetry = Telemetry(
            evaluations=est.evaluations,
            evaluations_total=(ckpt.evaluations if ckpt else 0) + est.evaluations,
            wall_seconds=time.perf_counter() - t_start, workers=evaluator.workers, partitions=len(partitions),
            backend=f"{evaluator.description}, {count(len(partitions), 'partition')}",
            versions=_versions(blas, evaluator.workers),
            resumed=None if ckpt is None else {"checkpoint": str(options.checkpoint), "step": ckpt.step,
                                                "evaluations_before": ckpt.evaluations},
            timing={"evaluation_seconds": stats.wall_seconds, "kernel_seconds": stats.kernel_seconds,
                    "overhead_per_evaluation_seconds": stats.overhead_seconds(),
                    "result_bytes_per_evaluation": stats.result_bytes / max(1, stats.evaluations)},
            gradient_rule=est.gradient_rule if options.estimator == "mle" else rule,
        )
        results = Results.from_estimate(est, config=options.to_dict(), data=problem.summary(), telemetry=telemetry,
                                        truth=problem.truth_for(est.param_names))
    finally:
        evaluator.close()
    if options.out:
        try:
            write_json_atomic(options.out, results.to_dict())
        except OSError as exc:
            raise ResultsNotWritten(str(write_error(options.out, exc)), results) from None
    if options.report:
        from estpipe.report import write_report

        try:
            write_report(results.to_dict(), options.report)
        except OSError as exc:
            raise ResultsNotWritten(str(write_error(options.report, exc)), results) from None
        reporter.log(f"wrote the report {options.report}")
    return results
