"""Two-step GMM, pure (DESIGN.md, "GMM, step by step" and "Units").

    estimate_gmm(source, problem, model, settings, x0, clustered, state=None, reporter=None) -> GmmEstimate

`source` is anything that answers the kernel's evaluations summed over the data (the execution
layer's evaluators do; a test's in-memory kernel may): this module starts no back end, writes no
file and knows no flag. Order: the data's units (Scaling); the start's checks (finite, not flat,
identified, S nonsingular); step 1; step 2 with W = S(b1)^-1; inference at the final estimate.
After every accepted iteration `reporter.checkpoint(state)` receives the run's GmmState, which
is all a resumed run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import math

import numpy as np

from estpipe.errors import UserError, term
from estpipe.estimation.inference import (JTest, check_identification, covariance_of_estimates, default_explanation,
                                          delta_method, j_test)
from estpipe.estimation.linalg import combinations_text, minimal_dependent_principal
from estpipe.estimation.optimizers import OPTIMIZERS, GmmObjective, IterationRecord, MomentOracle, run_optimizer
from estpipe.estimation.scaling import Scaling
from estpipe.estimation.weighting import WeightMatrix
from estpipe.text import count


class SumsSource(Protocol):
    """The sums of the whole data, wherever they are computed (execution/evaluator.py)."""

    def evaluate(self, request): ...  # the additive sums a kernel Request needs, over all the data

    def pullback_of(self, request, v): ...  # n G' v at request.params

    def column_absmax(self) -> tuple[np.ndarray, np.ndarray]: ...

    def within_set_covariance(self, inv_scale: np.ndarray) -> np.ndarray: ...


class Reporter:
    """Where a run's progress goes: log lines, accepted iterations, checkpoints. Silent here."""

    def log(self, message: str) -> None:
        pass

    def iteration(self, record: IterationRecord) -> None:
        pass

    def checkpoint(self, state: "GmmState") -> None:
        pass


@dataclass
class GmmSettings:
    """What changes the estimate: optimizer and derivatives (registry names), steps (1 or 2), the
    optimizer's tol and max_iter."""

    optimizer: str = "gauss-newton"
    derivatives: str = "dual"
    steps: int = 2
    tol: float = 1e-10
    max_iter: int = 200


@dataclass
class StepRecord:
    """One GMM step: its weighting, estimate, objective, and how the optimizer ended."""

    step: int
    weighting: str
    params: list[float]
    objective: float
    iterations: int
    evaluations: int
    converged: bool
    message: str
    # accepted iterations: {iteration, objective, gradient_norm, step_norm, evaluations, seconds}
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GmmState:
    """Where a run is: the step in progress, its weight, b1, the last accepted parameters, the
    finished steps, the history of accepted iterations, the run's units, and the evaluations so
    far (with those of earlier runs it resumed)."""

    step: int
    weight: WeightMatrix | None
    b1: np.ndarray | None
    params: np.ndarray
    steps_done: list[StepRecord] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    scaling: Scaling | None = None
    evaluations: int = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "weight": None if self.weight is None else self.weight.to_dict(),
                "b1": None if self.b1 is None else [float(v) for v in self.b1],
                "params": [float(v) for v in self.params], "evaluations": self.evaluations,
                "steps_done": [s.to_dict() for s in self.steps_done], "history": list(self.history),
                "scaling": None if self.scaling is None else self.scaling.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "GmmState":
        return cls(step=int(d["step"]), weight=None if d["weight"] is None else WeightMatrix.from_dict(d["weight"]),
                   b1=None if d["b1"] is None else np.array(d["b1"], dtype=np.float64),
                   params=np.array(d["params"], dtype=np.float64),
                   steps_done=[StepRecord(**s) for s in d.get("steps_done", [])],
                   history=list(d.get("history", [])),
                   scaling=None if d.get("scaling") is None else Scaling.from_dict(d["scaling"]),
                   evaluations=int(d["evaluations"]))


@dataclass
class GmmEstimate:
    """What a GMM run estimated: params (P,), covariance (P, P) under se_type, the final step's
    weight, the J test (None unless two steps and M > P), the objective Q at the estimate with
    that step's W, loglik of the chosen rows, the steps, convergence, and the evaluations this run
    made (map/reduces)."""

    params: np.ndarray
    param_names: list[str]
    covariance: np.ndarray
    se_type: str
    n_clusters: int | None
    weight: WeightMatrix
    j_test: JTest | None
    objective: float
    loglik: float | None
    converged: bool
    message: str
    steps: list[StepRecord]
    evaluations: int
    gradient_rule: str = ""
    derived: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    units: str = "sets"  # the independent observations of S: "sets", "clusters" or "panel units"
    moment_fit: dict | None = None  # overidentified only: each moment's g, its standard error, t (moment_fit)


def step_history(history: list[dict], step: int) -> list[dict]:
    """The accepted iterations of `step` (IterationRecord dicts, with those before a resume), as
    the results file keeps them: iteration, objective, gradient_norm, step_norm, evaluations
    (since the step started, as IterationRecord counts them; a resumed step's restart), seconds
    (likewise)."""
    return [{"iteration": h["iteration"], "objective": h["objective"], "gradient_norm": h["grad_norm"],
             "step_norm": h.get("step_norm"), "evaluations": h["evaluations"], "seconds": h["seconds"]}
            for h in history if h.get("step") == step]


def moment_fit(g_scaled, G, S, W: WeightMatrix, n: int, R, names) -> dict:
    """How each moment condition fits at the estimate (Hansen 1982): g_m over its standard error,
    Var(sqrt(n) g) = P S P' with P = I - G (G'WG)^-1 G'W, which for the efficient W = S^-1 is
    S - G (G'S^-1 G)^-1 G' (rank M - K). All in scaled moments (R g) and standardized parameters,
    where t = g / se is the same as in the data's units; g and se are returned in the data's."""
    M = len(g_scaled)
    A = W.whiten(np.eye(M), normalized=False)
    Wm = A.T @ A
    GW = G.T @ Wm
    P = np.eye(M) - G @ np.linalg.lstsq(GW @ G, GW, rcond=None)[0]
    V = P @ S @ P.T
    se = np.sqrt(np.clip(np.diag(V), 0.0, None) / n)
    top = float(np.sqrt(np.max(np.diag(S), initial=0.0) / n))
    ok = se > 1e-10 * top
    t = np.where(ok, g_scaled / np.where(ok, se, 1.0), np.nan)
    R = np.asarray(R, dtype=np.float64)
    return {"names": list(names), "g": (g_scaled / R).tolist(), "std_errors": (se / R).tolist(),
            "t": [None if not math.isfinite(v) else float(v) for v in t], "weighting": W.kind}


class _Gmm:
    """One run's steps: the data's units, the start's checks, the steps, inference."""

    def __init__(self, source: SumsSource, problem, model, settings: GmmSettings, clustered: bool,
                 reporter: Reporter, state: GmmState | None):
        self.source, self.problem, self.model, self.settings = source, problem, model, settings
        self.reporter, self.resumed = reporter, state
        self.K = problem.K
        self.names = model.param_names(problem.x_names)
        self.moment_names = problem.moment_names
        self.oracle = MomentOracle(source, clustered)
        # the independent observations of S: the clusters when used, else the decision makers
        # (panel units) when the file has them, else the sets
        self.units = "clusters" if clustered else ("panel units" if problem.has_panel else "sets")
        self.history: list[dict] = list(state.history) if state else []
        self.evaluations_before = state.evaluations if state else 0
        self.scaling: Scaling | None = None

    # -- checkpoints --------------------------------------------------------------------------------
    def _state(self, step, W, b1, params, steps_done) -> GmmState:
        return GmmState(step=step, weight=W, b1=None if b1 is None else np.asarray(b1),
                        params=np.asarray(params, dtype=np.float64), steps_done=list(steps_done),
                        history=self.history, scaling=self.scaling,
                        evaluations=self.evaluations_before + self.oracle.evaluations)

    # -- the data's units and the start --------------------------------------------------------------
    def _data_units(self) -> None:
        """The within-set spread of every column of X (in units of x / s), once per run: the
        columns' own units, which say when a parameter's column of the moment Jacobian is zero
        (x never varies within sets) rather than merely small."""
        cov = self.source.within_set_covariance(1.0 / self.scaling.seed_x)
        self.within = cov
        self.within_sd = np.sqrt(np.clip(np.diag(cov), 0.0, None) / max(self.problem.n_rows, 1))

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
                            f"{', ...' if len(x) > 6 else ''}): the utilities overflow; give a {term('start')} nearer zero "
                            "or rescale covariates with huge values")
        # In seed units the Jacobian of the scaled moments is O(s (1 - s)) per unit of x: zero when
        # every probability is 0 or 1, whatever the data's units.
        if np.abs(self.scaling.moments[:, None] * s.G).max() <= 1e-10:
            raise UserError(f"the objective is flat at {where}: every choice probability is 0 or 1 there (the utilities "
                            f"are huge), so no derivative information is left; give a {term('start')} nearer zero")
        return s

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
        # one parameter per column: a random coefficient's mean and sd share their column
        first: dict[int, int] = {}
        for k, col in enumerate(columns):
            if col is not None:
                first.setdefault(col, k)
        mapped = list(first.values())
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
                                     sums.n_units, where, self.units)
        B = Ws.whiten(self.scaling.moments[:, None] * sums.G, normalized=False) * self._rank_columns()[None, :]
        check_identification(B, self.names, where, self._explain)

    # -- the steps -----------------------------------------------------------------------------------
    def run(self, x0: np.ndarray) -> GmmEstimate:
        settings, oracle = self.settings, self.oracle
        optimizer = OPTIMIZERS.get(settings.optimizer)
        steps_done: list[StepRecord] = []
        step, W, b1, x = 1, None, None, x0
        if self.resumed is not None:
            r = self.resumed
            steps_done, step, x, b1, W, self.scaling = list(r.steps_done), r.step, r.params, r.b1, r.weight, r.scaling
        else:
            x_absmax, dm_absmax = self.source.column_absmax()
            self.scaling = Scaling.from_data(self.model.param_columns(self.K), x_absmax, dm_absmax)
        oracle.scaling = self.scaling
        where = "the start" if self.resumed is None else "the checkpoint's parameters"
        self._data_units()
        s0 = self._start_sums(x, where)
        self._check_identified(s0, where)
        if W is None:
            self.scaling.standardize(s0.G)
            # With M = P the weight cannot change the estimate, only the path: a unit-free one.
            first = WeightMatrix.standardized if len(self.moment_names) == len(x) else WeightMatrix.identity
            W = first(self.scaling.moments, s0.S_scaled, s0.n_sets)

        while step <= settings.steps:
            label = {"identity": "W = I", "standardized": "W = diag(S(b0))^-1 (M = K: the weight does not change "
                     "the estimate)", "inverse-covariance": "W = S(b1)^-1"}[W.kind]
            self.reporter.log(f"step {step}: {label}, {settings.optimizer}, derivatives {settings.derivatives}")

            def on_iteration(rec: IterationRecord, step=step, W=W, b1=b1) -> None:
                self.history.append(rec.to_dict())
                self.reporter.iteration(rec)
                self.reporter.checkpoint(self._state(step, W, b1, rec.params, steps_done))

            objective = GmmObjective(oracle, W, settings.derivatives, self.scaling)
            res = run_optimizer(objective, x, optimizer, settings.tol, settings.max_iter, step, on_iteration)
            steps_done.append(StepRecord(step=step, weighting=W.kind, params=res.x.tolist(), objective=res.fun,
                                         iterations=res.nit, evaluations=res.nfev, converged=res.success, message=res.message,
                                         history=step_history(self.history, step)))
            self.reporter.log(f"step {step} {'converged' if res.success else 'did NOT converge'}: {res.message} "
                              f"({count(res.nit, 'iteration')}, {count(res.nfev, 'evaluation')})")
            x = res.x
            if step == 1 and settings.steps == 2:
                b1 = x
                # S only: step 2 starts at b1 and reuses the [g | G] step 1 computed there
                s1 = oracle.sums(b1, jacobian=False, covariance=True)
                W = WeightMatrix.inverse_of(s1.S_scaled, self.scaling.moments, s1.n_sets, self.moment_names,
                                            s1.n_units, "the step-1 estimate b1", self.units)
            step += 1
            self.reporter.checkpoint(self._state(step, W, b1, x, steps_done))

        # inference at the final estimate
        s = oracle.sums(x, jacobian=True, covariance=True)
        g_scaled, S_scaled, n = self.scaling.g_scaled(s.g), s.S_scaled, s.n_sets
        where = "the final estimate"
        self._check_identified(s, where)
        G_theta = self.scaling.jacobian_theta(s.G)
        if settings.steps == 1:
            V_theta = covariance_of_estimates(W.whiten(G_theta), n, W.covariance_in_residual_space(S_scaled))
            jt = None
        else:
            S_final = WeightMatrix.inverse_of(S_scaled, self.scaling.moments, n, self.moment_names, s.n_units, where,
                                               self.units)
            V_theta = covariance_of_estimates(S_final.whiten(G_theta, normalized=False), n)
            jt = j_test(g_scaled, S_final, n, len(x))
        first_bad = next((r for r in steps_done if not r.converged), None)
        fit = moment_fit(g_scaled, G_theta, S_scaled, W, n, self.scaling.moments, self.moment_names) \
            if len(self.moment_names) > len(x) else None
        V = self.scaling.covariance_b(V_theta)
        signs = self.model.canonical_signs(x)  # e.g. a sd and -sd give the same model: report |sd|
        x, V = x * signs, V * np.outer(signs, signs)
        derived = delta_method(self.model.derived, x, V, self.model.derived_nulls())
        return GmmEstimate(
            params=x, param_names=list(self.names), covariance=V,
            derived=derived, notes=self.model.derived_notes({d.name: d.estimate for d in derived}),
            units=self.units,
            se_type="robust" if self.units == "sets" else "clustered",
            n_clusters=None if self.units == "sets" else int(s.n_units), weight=W, j_test=jt,
            objective=W.objective(g_scaled), loglik=float(s.loglik) if self.problem.has_chosen else None,
            converged=first_bad is None,
            message=steps_done[-1].message if first_bad is None else f"step {first_bad.step}: {first_bad.message}",
            steps=steps_done, evaluations=oracle.evaluations, moment_fit=fit,
        )


def estimate_gmm(source: SumsSource, problem, model, settings: GmmSettings, x0: np.ndarray, clustered: bool,
                 state: GmmState | None = None, reporter: Reporter | None = None) -> GmmEstimate:
    """Two-step (or one-step) GMM of `model` on the data `source` sums over.

    problem: the data's facts (data/problem.py: K, n_rows, x_names, moment_names, has_chosen);
    x0: (P,) the start, unless `state` (a resumed run's GmmState) is given; clustered: S (and the
    standard errors) from cluster sums. Raises UserError when the model is not identified, S is
    singular, or the start is not finite or flat; a run that does not converge returns
    converged=False."""
    return _Gmm(source, problem, model, settings, clustered, reporter or Reporter(), state).run(
        np.asarray(x0, dtype=np.float64))


class FixedParameters:
    """A SumsSource over some of a model's parameters, the others held fixed: params (len(free),)
    of a request become the full (P,) vector `fixed` with `free` filled in, and the sums' Jacobian
    keeps the free columns. It lets the GMM of a simpler model (the logit) run on the evaluator of
    a model that nests it (the nested logit at lambda = 1) without loading the data again."""

    def __init__(self, source: SumsSource, fixed: np.ndarray, free: np.ndarray):
        self.source = source
        self.fixed = np.asarray(fixed, dtype=np.float64)
        self.free = np.asarray(free, dtype=np.int64)

    def _full(self, request):
        params = self.fixed.astype(np.result_type(self.fixed, request.params))
        params[self.free] = request.params

        def widen(v, fill):
            if v is None:
                return None
            out = np.full(len(self.fixed), fill, dtype=np.float64)
            out[self.free] = v
            return out

        from dataclasses import replace

        return replace(request, params=params, seed_scale=widen(request.seed_scale, 1.0),
                       fd_steps=widen(request.fd_steps, 1.0))

    def evaluate(self, request):
        # moment or likelihood sums alike: each kind knows its parameters' columns
        return self.source.evaluate(self._full(request)).restricted(self.free)

    def pullback_of(self, request, v):
        return np.asarray(self.source.pullback_of(self._full(request), v))[self.free]

    def column_absmax(self):
        return self.source.column_absmax()

    def within_set_covariance(self, inv_scale):
        return self.source.within_set_covariance(inv_scale)


def logit_start(source: SumsSource, problem, model, logit, settings: GmmSettings, clustered: bool,
                reporter: Reporter | None = None) -> np.ndarray | None:
    """The start of a model whose first K parameters are the logit's coefficients and whose
    default start for the others makes it the logit (Model.logit_start: the nested logit at
    lambda = 1): those K from a one-step logit GMM on the same data and evaluator, the others at
    their default. None for other models. A nested logit cannot start at b = 0: every utility is
    0 there and the moments hardly move with lambda. logit: the logit model (models.Logit)."""
    if not getattr(model, "logit_start", False):
        return None

    K = problem.K
    x0 = np.asarray(model.start(K), dtype=np.float64)
    free = np.arange(K)
    first = GmmSettings(optimizer="gauss-newton", derivatives="dual", steps=1, tol=settings.tol,
                        max_iter=settings.max_iter)
    est = estimate_gmm(FixedParameters(source, x0, free), problem, logit, first, x0[:K], clustered,
                       reporter=None)
    if reporter is not None:
        reporter.log(f"start: the coefficients of a one-step logit fit ({count(est.evaluations, 'evaluation')}), "
                     f"the other parameters at their default")
    x0[free] = est.params
    return x0
