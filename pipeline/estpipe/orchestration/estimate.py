"""`estimate(path, options) -> Results`: the whole of `estpipe estimate`, as a Python function.

Order (DESIGN.md): check the options and the file; plan partitions; start or reach the back end
(which loads every partition once, where it stays); check the start (finite objective, identified
parameters, nonsingular S); step 1 with W = I; step 2 with W = S(b1)^-1; inference at the final
estimate; results. Checkpoints are written after every accepted iteration.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from estpipe.data.format import ChoiceDataFile
from estpipe.errors import EXIT_NOT_CONVERGED, EXIT_OK, EXIT_USER, UserError
from estpipe.execution import make_evaluator
from estpipe.execution.planning import default_partitions, plan_partitions
from estpipe.orchestration.checkpoint import Checkpoint, load_checkpoint
from estpipe.estimation.inference import check_identification, covariance_of_estimates, default_explanation, j_test
from estpipe.estimation.linalg import combinations_text, minimal_dependent_principal
from estpipe.estimation.optimizers import GmmObjective, IterationRecord, MomentOracle, run_optimizer
from estpipe.orchestration.options import EstimateOptions
from estpipe.estimation.results import Results, StepRecord
from estpipe.estimation.scaling import Scaling
from estpipe.estimation.weighting import WeightMatrix
from estpipe.models import get_model
from estpipe.outputs import check_writable, write_error
from estpipe.text import count


class Reporter:
    """Where progress goes. The base class is silent; StderrReporter prints."""

    def log(self, message: str) -> None:
        pass

    def iteration(self, record: IterationRecord) -> None:
        pass


class StderrReporter(Reporter):
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def log(self, message: str) -> None:
        print(f"estpipe: {message}", file=self.stream, flush=True)

    def iteration(self, r: IterationRecord) -> None:
        print(f"step {r.step} iter {r.iteration:3d}  Q = {r.objective:.10e}  |grad|inf = {r.grad_norm:.3e}  "
              f"|step| = {r.step_norm:.3e}  {r.seconds:7.2f} s  ({count(r.evaluations, 'evaluation')})",
              file=self.stream, flush=True)


def _check_output_paths(options: EstimateOptions) -> None:
    """Each output file can be written (a probe file in its folder), before any work."""
    for flag, p in (("--out", options.out), ("--checkpoint", options.checkpoint)):
        if p is not None:
            check_writable(p, flag)


class ResultsNotWritten(UserError):
    """The estimation finished but its results file could not be written. `results` holds them
    (the CLI prints them before the error line); the exit code is 3 when the run did not
    converge, else 2."""

    def __init__(self, message: str, results: Results):
        super().__init__(message)
        self.results = results
        self.exit_code = EXIT_NOT_CONVERGED if not results.converged else EXIT_USER


def _cap_workers(options: EstimateOptions, n_sets: int, cluster, log) -> EstimateOptions:
    """At most one worker per partition the file can have (a partition is at least one set, or
    one cluster when the file has clusters): surplus workers would hold nothing but still cost a
    process each. Capped with a note rather than refused: the run is the same with fewer."""
    if options.scheduler or options.scheduler_file or options.workers <= 1:
        return options
    most = int(len(np.unique(cluster))) if cluster is not None else n_sets
    if options.workers <= most:
        return options
    unit = "cluster" if cluster is not None else "set"
    log(f"note: --workers {options.workers} is more than the {most} partition{'s' if most != 1 else ''} this file can "
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
    path = Path(path)
    with ChoiceDataFile(path) as f:
        n_sets, n_rows, K, M = f.n_sets, f.n_rows, f.K, f.M
        x_names, moment_names = f.param_names, f.moment_names
        has_chosen, has_cluster, truth = f.has_chosen, f.has_cluster, f.truth
        offsets, cluster = f.offsets, f.read_cluster()
        fingerprint = f.fingerprint()
    model = get_model(options.model)
    P = model.n_params(K)
    names = model.param_names(x_names)
    if M < P:
        raise UserError(f"{path}: M = {count(M, 'moment')} for {count(P, 'parameter')}; GMM needs at least as many moments as parameters: "
                        "add instruments (estpipe load --z) or drop covariates")
    if options.start is not None:
        if len(options.start) != P:
            raise UserError(f"--start has {count(len(options.start), 'value')}, but model {options.model} on {path} has {count(P, 'parameter')} "
                            f"({', '.join(names[:6])}{', ...' if P > 6 else ''}); give {P} comma-separated numbers")
        x0 = np.array(options.start, dtype=np.float64)
    else:
        x0 = np.asarray(model.start(K), dtype=np.float64)
    clustered = has_cluster and not options.no_cluster

    ckpt = None
    if options.checkpoint and options.resume:
        ckpt = load_checkpoint(options.checkpoint, fingerprint, options.result_options(), str(path))
        reporter.log(f"resuming from {options.checkpoint}: step {ckpt.step}, {count(ckpt.evaluations, 'evaluation')} so far"
                     if ckpt else f"no checkpoint at {options.checkpoint} yet: starting fresh")
    checkpoint_existed = bool(options.checkpoint) and Path(options.checkpoint).exists()
    options = _cap_workers(options, n_sets, cluster if has_cluster else None, reporter.log)

    def plan(n_workers: int):
        # the back end calls this once it knows its workers (an existing cluster's, once connected)
        return plan_partitions(offsets, options.partitions or default_partitions(n_workers), cluster if has_cluster else None)

    evaluator = make_evaluator(path, options, plan, K=K, M=M, has_chosen=has_chosen, has_cluster=has_cluster,
                               fingerprint=fingerprint, log=reporter.log)
    partitions = evaluator.partitions
    try:
        reporter.log(f"{count(n_sets, 'set')}, {n_rows} rows, K = {K}, M = {M}; {evaluator.description}; "
                     f"{len(partitions)} partition{'s' if len(partitions) != 1 else ''}")
        blas = evaluator.blas()
        oracle = MomentOracle(evaluator, clustered)
        run = _Run(options, reporter, oracle, names, moment_names, fingerprint, ckpt, has_chosen, model, K, n_rows)
        try:
            results_core = run.steps(x0)
        except UserError:
            if options.checkpoint and not checkpoint_existed and Path(options.checkpoint).exists():
                os.unlink(options.checkpoint)
            raise
        stats = evaluator.stats
        results = Results(
            **results_core,
            evaluations=oracle.evaluations,
            evaluations_total=(ckpt.evaluations if ckpt else 0) + oracle.evaluations,
            wall_seconds=time.perf_counter() - t_start,
            workers=evaluator.workers,
            partitions=len(partitions),
            config=options.to_dict(),
            data={"path": str(path.resolve()), "n_sets": n_sets, "n_rows": n_rows, "K": K, "M": M, "fingerprint": fingerprint},
            versions=_versions(blas, evaluator.workers),
            truth=truth if truth is not None and len(truth) == P else None,
            backend=f"{evaluator.description}, {len(partitions)} partition{'s' if len(partitions) != 1 else ''}",
            resumed=None if ckpt is None else {"checkpoint": str(options.checkpoint), "step": ckpt.step,
                                                "evaluations_before": ckpt.evaluations},
            timing={"evaluation_seconds": stats.wall_seconds, "kernel_seconds": stats.kernel_seconds,
                    "overhead_per_evaluation_seconds": stats.overhead_seconds(),
                    "result_bytes_per_evaluation": stats.result_bytes / max(1, stats.evaluations)},
        )
    finally:
        evaluator.close()
    if options.out:
        try:
            results.write(options.out)
        except OSError as exc:
            raise ResultsNotWritten(str(write_error(options.out, exc)), results) from None
    return results


class _Run:
    """The GMM steps of one run, with checkpoints; returns the fields of Results it decides."""

    def __init__(self, options, reporter, oracle, names, moment_names, fingerprint, ckpt: Checkpoint | None,
                 has_chosen: bool, model, K: int, n_rows: int):
        self.o, self.reporter, self.oracle, self.has_chosen = options, reporter, oracle, has_chosen
        self.names, self.moment_names, self.fingerprint, self.ckpt = names, moment_names, fingerprint, ckpt
        self.model, self.K, self.n_rows = model, K, n_rows
        self.history: list[dict] = list(ckpt.history) if ckpt else []
        self.evaluations_before = ckpt.evaluations if ckpt else 0
        self.scaling: Scaling | None = None
        self.checkpoint_failed = False

    def _save(self, step: int, W: WeightMatrix | None, b1, params, steps_done: list[StepRecord]) -> None:
        if not self.o.checkpoint:
            return
        try:
            Checkpoint(
                fingerprint=self.fingerprint, options=self.o.result_options(), step=step,
                weight=None if W is None else W.to_dict(), b1=None if b1 is None else list(map(float, b1)),
                params=list(map(float, params)), evaluations=self.evaluations_before + self.oracle.evaluations,
                steps_done=[s.to_dict() for s in steps_done], history=self.history,
                scaling=self.scaling.to_dict(),
            ).save(self.o.checkpoint)
        except OSError as exc:
            # The estimate matters more than the checkpoint: go on (the last one written, if any,
            # stays valid) and say so once; later iterations try again.
            if not self.checkpoint_failed:
                self.reporter.log(f"warning: {write_error(self.o.checkpoint, exc)}; going on without a new "
                                  "checkpoint, so a resumed run would start from the last one written")
            self.checkpoint_failed = True

    def _start_sums(self, x: np.ndarray, where: str):
        """g, G and S at x (the start or the checkpoint's parameters), checked to be finite and
        informative."""
        try:
            # overflow here is the user's start, reported below, not a warning per array
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                s = self.oracle.sums(x, jacobian=True, covariance=True)
            finite = bool(np.all(np.isfinite(s.g)) and np.all(np.isfinite(s.G)) and np.all(np.isfinite(s.hh)))
        except FloatingPointError:
            finite = False
        if not finite:
            raise UserError(f"the objective is not finite at {where} ({', '.join(f'{v:g}' for v in x[:6])}"
                            f"{', ...' if len(x) > 6 else ''}): the utilities overflow; give a --start nearer zero "
                            "or rescale covariates with huge values")
        # In seed units the Jacobian of the scaled moments is O(s (1 - s)) per unit of x: zero when
        # every probability is 0 or 1, whatever the data's units.
        if np.abs(self.scaling.moments[:, None] * s.G).max() <= 1e-10:
            raise UserError(f"the objective is flat at {where}: every choice probability is 0 or 1 there (the utilities "
                            "are huge), so no derivative information is left; give a --start nearer zero")
        return s

    def _data_units(self) -> None:
        """The within-set spread of every column of X (in units of x / s), once per run: the
        columns' own units, which say when a parameter's column of the moment Jacobian is zero
        (x never varies within sets) rather than merely small."""
        cov = self.oracle.evaluator.within_set_covariance(1.0 / self.scaling.seed_x)
        rows = self.n_rows
        self.within = cov
        self.within_sd = np.sqrt(np.clip(np.diag(cov), 0.0, None) / max(rows, 1))

    def _rank_columns(self) -> np.ndarray:
        """Multipliers (P,) of the kernel's Jacobian columns dg/dbeta for the rank decision: per
        within-set standard deviation of the parameter's column of X where it has one (the data's
        own unit), else per standardized parameter (Jacobi scaling at the start)."""
        columns = self.model.param_columns(self.K)
        sc = self.scaling
        out = sc.seed / sc.params
        for k, col in enumerate(columns):
            if col is not None and self.within_sd[col] > 0:
                out[k] = sc.seed[k] / (sc.seed_x[col] * self.within_sd[col])
        return out

    def _explain(self, cols: list[int], v: np.ndarray) -> str:
        """The data fact behind a set of parameters the moments cannot tell apart (null vector v
        in the columns of the rank matrix), for parameters that each multiply a column of X."""
        names = [self.names[k] for k in cols]
        columns = self.model.param_columns(self.K)
        direction = v * self._rank_columns()[cols] / self.scaling.seed[cols]  # in the model's parameters
        if any(columns[k] is None for k in cols):
            return default_explanation(names, direction)
        xcols = [columns[k] for k in cols]
        in_x = direction * self.scaling.seed_x[xcols]  # the direction on x / s
        Cw = self.within[np.ix_(xcols, xcols)]
        spread = float(in_x @ Cw @ in_x)
        reference = float(np.sum(in_x**2 * np.diag(Cw)))
        if len(cols) == 1:
            return (f"{names[0]} varies within sets, but no moment responds to it: the instruments do not move with "
                    f"{names[0]}; add an instrument that does (estpipe load --z), or drop it")
        if reference > 0 and spread <= 1e-12 * reference:
            return (f"{', '.join(names)} are collinear within sets: in every set {combinations_text(names, direction)} "
                    "plus a constant per set; drop one of them")
        return (f"{', '.join(names)} are not collinear in the data, but the moments cannot tell them apart (the "
                f"instruments do not vary separately with them); add instruments that move with each of them "
                "(estpipe load --z), or drop one")

    def _check_collinear_x(self, where: str) -> None:
        """Columns of X that parameters multiply and that are collinear within sets (a data fact,
        whatever the instruments): the smallest such set, with the relation between them."""
        columns = self.model.param_columns(self.K)
        mapped = [k for k, col in enumerate(columns) if col is not None]
        if len(mapped) < 2:
            return
        xcols = [columns[k] for k in mapped]
        Cw = self.within[np.ix_(xcols, xcols)]
        found = minimal_dependent_principal(Cw)
        if found is None:
            return
        sub = Cw[np.ix_(found, found)]
        d = np.sqrt(np.diag(sub))
        _, vectors = np.linalg.eigh(sub / np.outer(d, d))
        in_x = vectors[:, 0] / d / self.scaling.seed_x[[xcols[i] for i in found]]
        names = [self.names[mapped[i]] for i in found]
        raise UserError(f"the parameters are not identified at {where}: {', '.join(names)} are collinear within sets: "
                        f"in every set {combinations_text(names, in_x)} plus a constant per set; drop one of them")

    def _check_identified(self, sums, where: str) -> None:
        """Identification at a point, whatever the step's W: the columns of X that never vary
        within sets first (a data fact), then the moment covariance S, then the singular values
        of the Jacobian whitened by S^-1 with columns in the data's units."""
        columns = self.model.param_columns(self.K)
        flat = [self.names[k] for k, col in enumerate(columns) if col is not None and not self.within_sd[col] > 1e-12]
        if flat:
            many = len(flat) > 1
            raise UserError(
                f"the parameters are not identified at {where}: {', '.join(flat)} never var{'y' if many else 'ies'} "
                "within sets (only differences within a set identify a logit; a constant per decision maker drops "
                f"out): drop {'them' if many else 'it'} or interact {'them' if many else 'it'} with alternative attributes")
        self._check_collinear_x(where)
        Ws = WeightMatrix.inverse_of(sums.S_scaled, self.scaling.moments, sums.n_sets, self.moment_names,
                                     sums.n_units, where)
        B = Ws.whiten(self.scaling.moments[:, None] * sums.G, normalized=False) * self._rank_columns()[None, :]
        check_identification(B, self.names, where, self._explain)

    def steps(self, x0: np.ndarray) -> dict:
        o, oracle = self.o, self.oracle
        steps_done: list[StepRecord] = []
        step, W, b1, x = 1, None, None, x0
        if self.ckpt is not None:
            c = self.ckpt
            steps_done = [StepRecord(**d) for d in c.steps_done]
            step, x, b1 = c.step, np.array(c.params), (None if c.b1 is None else np.array(c.b1))
            W = WeightMatrix.from_dict(c.weight)
            self.scaling = Scaling.from_dict(c.scaling)
        else:
            x_absmax, dm_absmax = oracle.evaluator.column_absmax()
            self.scaling = Scaling.from_data(self.model.param_columns(self.K), x_absmax, dm_absmax)
        oracle.scaling = self.scaling
        where = "the start" if self.ckpt is None else "the checkpoint's parameters"
        self._data_units()
        s0 = self._start_sums(x, where)
        self._check_identified(s0, where)
        if W is None:
            self.scaling.standardize(s0.G)
            # With M = P the weight cannot change the estimate, only the path: a unit-free one.
            first = WeightMatrix.standardized if len(self.moment_names) == len(x) else WeightMatrix.identity
            W = first(self.scaling.moments, s0.S_scaled, s0.n_sets)

        while step <= o.steps:
            label = {"identity": "W = I", "standardized": "W = diag(S(b0))^-1 (M = K: the weight does not change "
                     "the estimate)", "inverse-covariance": "W = S(b1)^-1"}[W.kind]
            self.reporter.log(f"step {step}: {label}, {o.optimizer}, derivatives {o.derivatives}")

            def on_iteration(rec: IterationRecord, step=step, W=W, b1=b1) -> None:
                self.history.append(rec.to_dict())
                self.reporter.iteration(rec)
                self._save(step, W, b1, rec.params, steps_done)

            objective = GmmObjective(oracle, W, o.derivatives, self.scaling)
            res = run_optimizer(objective, x, o.optimizer, o.tol, o.max_iter, step, on_iteration)
            steps_done.append(StepRecord(step=step, weighting=W.kind, params=res.x.tolist(), objective=res.fun,
                                         iterations=res.nit, evaluations=res.nfev, converged=res.success, message=res.message))
            self.reporter.log(f"step {step} {'converged' if res.success else 'did NOT converge'}: {res.message} "
                              f"({count(res.nit, 'iteration')}, {count(res.nfev, 'evaluation')})")
            x = res.x
            if step == 1 and o.steps == 2:
                b1 = x
                # S only: step 2 starts at b1 and reuses the [g | G] step 1 computed there
                s1 = oracle.sums(b1, jacobian=False, covariance=True)
                W = WeightMatrix.inverse_of(s1.S_scaled, self.scaling.moments, s1.n_sets, self.moment_names,
                                            s1.n_units, "the step-1 estimate b1")
            step += 1
            self._save(step, W, b1, x, steps_done)

        # inference at the final estimate
        s = oracle.sums(x, jacobian=True, covariance=True)
        g_scaled, S_scaled, n = self.scaling.g_scaled(s.g), s.S_scaled, s.n_sets
        where = "the final estimate"
        self._check_identified(s, where)
        G_theta = self.scaling.jacobian_theta(s.G)
        if o.steps == 1:
            V_theta = covariance_of_estimates(W.whiten(G_theta), n, W.covariance_in_residual_space(S_scaled))
            jt = None
        else:
            S_final = WeightMatrix.inverse_of(S_scaled, self.scaling.moments, n, self.moment_names, s.n_units, where)
            V_theta = covariance_of_estimates(S_final.whiten(G_theta, normalized=False), n)
            jt = j_test(g_scaled, S_final, n, len(x))
        V = self.scaling.covariance_b(V_theta)
        converged = all(r.converged for r in steps_done)
        first_bad = next((r for r in steps_done if not r.converged), None)
        message = steps_done[-1].message if first_bad is None else f"step {first_bad.step}: {first_bad.message}"
        return dict(
            params=x, param_names=list(self.names), std_errors=np.sqrt(np.diag(V)),
            se_type="clustered" if oracle.clustered else "robust", covariance=V,
            n_clusters=int(s.n_units) if oracle.clustered else None, objective=W.objective(g_scaled),
            j_statistic=None if jt is None else jt.statistic, j_df=None if jt is None else jt.df,
            j_pvalue=None if jt is None else jt.pvalue, loglik=float(s.loglik) if self.has_chosen else None,
            converged=converged, message=message, steps=steps_done,
        )


def run_estimate(path: str | os.PathLike, options: EstimateOptions, stdout=None, stderr=None) -> int:
    """What `estpipe estimate` does: estimate, print a table (or JSON with options.json) on
    stdout, progress on stderr; returns the exit code (0 converged, 3 not converged).
    UserError propagates (the CLI prints it, exit code 2)."""
    stdout = stdout or sys.stdout
    try:
        results = estimate(path, options, reporter=StderrReporter(stderr or sys.stderr))
    except ResultsNotWritten as exc:
        # the results first, where they cannot be lost; then the CLI prints the error line
        print(exc.results.to_json() if options.json else exc.results.table(), file=stdout, flush=True)
        raise
    print(results.to_json() if options.json else results.table(), file=stdout, flush=True)
    return EXIT_OK if results.converged else EXIT_NOT_CONVERGED
