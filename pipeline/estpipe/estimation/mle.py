"""Maximum likelihood, pure (DESIGN.md, "Maximum likelihood").

    estimate_mle(source, problem, model, settings, x0, clustered, reporter=None, state=None) -> MleEstimate

`source` answers the kernel's "likelihood" request summed over the data (LikelihoodSums: the
log-likelihood, the score sum and the OPG per independent unit and per cluster); this module
starts no back end and knows no flag. The log-likelihood is maximized by an MLE_OPTIMIZERS entry
(bfgs, l-bfgs-b, bhhh, trust-newton) on the exact gradient in standardized parameters theta = D b
(D_k = the root mean square of unit scores at the start, so the optimizer sees no data units),
then polished by BHHH steps (the OPG comes with every evaluation). ONE Hessian at the final
estimate, exact where the kernel has one (the textbook logit; the mixed logit with normal
coefficients), else the forward difference of the
exact gradient (P evaluations; none when trust-newton has it there), then gives the classical
standard errors
(-H)^-1 and, with the OPG B, the robust sandwich H^-1 B H^-1 (clustered: B from cluster sums).
After every accepted iteration (the optimizer's, then the polish's) and at the end
`reporter.checkpoint(state)` receives the run's MleState, which is all a resumed run needs.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from estpipe.errors import UserError, cli_flag, term
from estpipe.estimation.gmm import Reporter, StepRecord
from estpipe.estimation.inference import delta_method
from estpipe.kernel.request import Request
from estpipe.registry import Registry
from estpipe.text import count

HESSIAN_STEP = float(np.finfo(float).eps ** (1 / 3))  # central differences: error ~ step^2
FORWARD_STEP = float(np.sqrt(np.finfo(float).eps))  # forward differences: error ~ step
POLISH_STEPS = 20
POLISH_STALL = 0.5  # a polish step that does not halve max |mean score| twice in a row hands over to Newton steps


@dataclass
class MleSettings:
    """tol: the optimizer's gtol on the mean standardized score and the Newton polish's step size
    in theta; max_iter: the optimizer's iterations; optimizer: an MLE_OPTIMIZERS name."""

    tol: float = 1e-10
    max_iter: int = 200
    optimizer: str = "bfgs"
    se: str | None = None  # None or "robust": the sandwich (clustered with clusters); "classical"; "bhhh"


@dataclass
class MleEstimate:
    """What an MLE run estimated, in the fields Results.from_estimate reads (as GmmEstimate),
    plus `covariances` (classical, robust or clustered) and `likelihood` (loglik_null, rho
    squared, aic, bic, n_units).

    params (P,); covariance (P, P) under se_type; objective: -loglik."""

    params: np.ndarray
    param_names: list[str]
    covariance: np.ndarray
    covariances: dict
    se_type: str
    n_clusters: int | None
    objective: float
    loglik: float
    likelihood: dict
    converged: bool
    message: str
    steps: list[StepRecord]
    evaluations: int
    hessian_evaluations: int = 0
    weight: None = None
    j_test: None = None
    gradient_rule: str = "dual blocks of the log-probabilities (scores)"
    derived: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    units: str = "sets"


PHASES = ("optimizer", "polish", "finished")


@dataclass
class MleState:
    """Where an MLE run is: its phase (the optimizer's iterations, the BHHH polish, or finished),
    the parameters b (P,) of the last accepted iteration (when finished, the estimate before the
    canonical signs), the standardization D (P,) fixed at the start (theta = D b: a resumed run
    keeps it, so its optimizer works in the same units), the optimizer's accepted iterations and
    polish steps so far, the evaluations so far (with those of earlier runs it resumed), the
    history of accepted iterations, and the optimizer's closing message once it has one (when
    finished, the run's message)."""

    params: np.ndarray
    D: np.ndarray
    phase: str = "optimizer"
    iterations: int = 0
    polish_steps: int = 0
    evaluations: int = 0
    history: list[dict] = field(default_factory=list)
    message: str = ""

    estimator = "mle"
    step = 1  # the one "step" of an MLE (results' steps[0]; the resume line's "step 1")

    def to_dict(self) -> dict:
        return {"estimator": self.estimator, "phase": self.phase, "params": [float(v) for v in self.params],
                "D": [float(v) for v in self.D], "iterations": self.iterations, "polish_steps": self.polish_steps,
                "evaluations": self.evaluations, "history": list(self.history), "message": self.message}

    @classmethod
    def from_dict(cls, d: dict) -> "MleState":
        if d.get("phase") not in PHASES:
            raise ValueError(f"phase {d.get('phase')!r}")
        return cls(params=np.array(d["params"], dtype=np.float64), D=np.array(d["D"], dtype=np.float64),
                   phase=d["phase"], iterations=int(d["iterations"]), polish_steps=int(d["polish_steps"]),
                   evaluations=int(d["evaluations"]), history=list(d.get("history", [])),
                   message=str(d.get("message", "")))


class LikelihoodOracle:
    """The whole data's LikelihoodSums at b, memoized on the last MEMO parameter vectors,
    counting evaluations (map/reduces). sums(b, opg=False) asks for the log-likelihood and score
    only (what BFGS's calls need: the OPG's per-unit products are skipped); a memo with the OPG
    answers either. More than one point is kept so that an optimizer's callback, which asks for
    the accepted point after the optimizer may have evaluated others (trust-exact's Hessian, a
    rejected trial), costs no evaluation: the history and checkpoints do not change the count."""

    MEMO = 64

    def __init__(self, source, clustered: bool):
        self.source, self.clustered = source, clustered
        self.evaluations = 0
        self._memo: OrderedDict[bytes, object] = OrderedDict()
        # the OPG with every score where it costs no extra pass (LikelihoodSums.opg_with_score,
        # learned from the first evaluation): the polish's first point is then the optimizer's last
        self.opg_always = False

    def sums(self, b: np.ndarray, opg: bool = True, hessian: bool = False):
        """hessian: ask for the exact Hessian too (where the kernel has one: every evaluation's
        LikelihoodSums.has_hessian says whether it has)."""
        b = np.asarray(b, dtype=np.float64)
        opg = opg or self.opg_always
        key = b.tobytes()
        hit = self._memo.get(key)
        if hit is not None and (hit.opg is not None or not opg) and (hit.hessian is not None or not hessian):
            self._memo.move_to_end(key)
            return hit
        s = self.source.evaluate(Request.for_likelihood(b.copy(), clustered=self.clustered, opg=opg, hessian=hessian))
        self.evaluations += 1
        self.opg_always = s.opg_with_score
        self._memo[key] = s
        self._memo.move_to_end(key)
        while len(self._memo) > self.MEMO:
            self._memo.popitem(last=False)
        return s

    def exact_hessian(self, b: np.ndarray) -> np.ndarray:
        """The kernel's exact d2 loglik / db2 (P, P) at b, in one evaluation (only where the
        first evaluation showed it has one: LikelihoodSums.hessian not None)."""
        s = self.source.evaluate(Request.for_likelihood(np.array(b, dtype=np.float64), clustered=self.clustered,
                                                        score=False, opg=False, hessian=True))
        self.evaluations += 1
        return s.hessian


def hessian(score, b: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """d score / d b (P, P) by central differences of the exact score(b) (P,), steps (P,) in b's
    units; symmetrized."""
    P = len(b)
    H = np.empty((P, P))
    for k in range(P):
        e = np.zeros(P)
        e[k] = steps[k]
        H[:, k] = (score(b + e) - score(b - e)) / (2 * steps[k])
    return (H + H.T) / 2


def forward_hessian(score, b: np.ndarray, steps: np.ndarray, g0: np.ndarray | None = None) -> np.ndarray:
    """d score / d b (P, P) by forward differences of the exact score(b) (P,) from g0 = score(b)
    (P evaluations beside it), steps (P,) in b's units; symmetrized. Its error is O(step) ~ 1e-8
    relative (measured against complex steps of the score: 1.0e-8 and 1.4e-8 on two mixed
    logits, where central differences give 2e-11 in twice the evaluations; the standard errors
    move by 6e-8 relative), far inside the 1e-6 the estimator's tests ask."""
    P = len(b)
    g0 = score(b) if g0 is None else g0
    H = np.empty((P, P))
    for k in range(P):
        e = np.zeros(P)
        e[k] = steps[k]
        H[:, k] = (score(b + e) - g0) / steps[k]
    return (H + H.T) / 2


def _inverse_negative(H: np.ndarray, names: list[str], where: str, simulated: bool = False) -> np.ndarray:
    """(-H)^-1, or a UserError naming the parameters the likelihood does not identify."""
    w, V = np.linalg.eigh(-H)
    top = float(np.max(np.abs(w), initial=0.0))
    if not np.all(np.isfinite(w)) or w.size and w.min() <= 1e-12 * top or top == 0.0:
        k = int(np.argmin(w)) if np.all(np.isfinite(w)) else 0
        worst = np.argsort(-np.abs(V[:, k]))[:3]
        raise UserError(f"the log-likelihood is flat or not concave at {where} (smallest curvature {w.min():.3g}, "
                        f"largest {top:.3g}): the data do not identify {', '.join(names[i] for i in worst)}; drop or "
                        f"fix those parameters, or give {term('start')} nearer the estimate"
                        + (f", or more {term('draws')} (with few draws per decision maker a simulated likelihood "
                           "can lack an interior maximum)" if simulated else ""))
    inv = (V / w) @ V.T
    return (inv + inv.T) / 2



class LikelihoodObjective:
    """-loglik / n in standardized parameters theta = D b, as the optimizers see it: value (1,),
    gradient (P,), OPG mean (P, P) and the central-difference Hessian of the exact gradient
    (P, P), all through one memoized LikelihoodOracle; counts the evaluations the Hessians took."""

    def __init__(self, oracle: LikelihoodOracle, D: np.ndarray, n: float, needs_opg: bool = False):
        self.oracle, self.D, self.n = oracle, D, n
        self.needs_opg = needs_opg  # BHHH: every point's OPG (its value and gradient come with it)
        self.exact = False  # whether the source gives an exact Hessian (maximize learns it at the start)
        self.hessian_rule = "forward differences of the exact score"
        self.hessian_evaluations = 0
        self._hessians: dict[bytes, np.ndarray] = {}

    def sums(self, theta, opg: bool = False):
        return self.oracle.sums(np.asarray(theta, dtype=np.float64) / self.D, opg=opg or self.needs_opg)

    def value(self, theta) -> float:
        s = self.sums(theta)
        return -s.loglik / self.n if math.isfinite(s.loglik) else np.inf

    def gradient(self, theta) -> np.ndarray:
        return -self.sums(theta).score / self.D / self.n

    def opg(self, theta) -> np.ndarray:
        """B_theta = sum_u s_u s_u' / n in theta's units (P, P): BHHH's curvature."""
        return self.sums(theta, opg=True).opg / np.outer(self.D, self.D) / self.n

    def hessian(self, theta) -> np.ndarray:
        """d gradient / d theta (P, P), memoized by theta: exact in one evaluation where the
        kernel has it (the textbook logit: -sum_i X_i'(diag(s_i) - s_i s_i')X_i, measured 20x
        cheaper than central differences at 20,000 x 30, K = 20), else by forward differences
        of the exact gradient (P evaluations; forward_hessian says why not central)."""
        theta = np.asarray(theta, dtype=np.float64)
        key = theta.tobytes()
        if key not in self._hessians:
            e0 = self.oracle.evaluations
            H = None
            if self.exact:
                H = -self.oracle.exact_hessian(theta / self.D) / np.outer(self.D, self.D) / self.n
                self.hessian_rule = "exact"
            if H is None:  # the gradient at theta is the oracle's memo (the last accepted point)
                H = forward_hessian(self.gradient, theta, FORWARD_STEP * np.maximum(1.0, np.abs(theta)))
                self.hessian_rule = "forward differences of the exact score"
            self._hessians[key] = H
            self.hessian_evaluations += self.oracle.evaluations - e0
        return self._hessians[key]

    def hessian_known(self, theta) -> bool:
        return np.asarray(theta, dtype=np.float64).tobytes() in self._hessians


class MleOptimizer:
    """One optimizer of -loglik/n in theta: minimize(objective, theta0, gtol, max_iter, accepted)
    -> (theta, iterations, success, message). accepted(theta), when given, is called after every
    accepted iteration (scipy's callback; BHHH's own), for the history and the checkpoint."""

    name = ""
    description = ""
    needs_opg = False  # per-unit scores (a derivative mode that gives only the summed gradient cannot)

    def minimize(self, objective: LikelihoodObjective, theta0, gtol: float, max_iter: int, accepted=None):
        raise NotImplementedError


def _scipy_callback(accepted):
    return None if accepted is None else (lambda xk: accepted(np.array(xk, dtype=np.float64)))


class ScipyQuasiNewton(MleOptimizer):
    method = ""

    def minimize(self, objective, theta0, gtol, max_iter, accepted=None):
        opts = {"gtol": gtol, "maxiter": max_iter}
        if self.method == "L-BFGS-B":
            opts["ftol"] = np.finfo(float).eps  # let gtol decide, as for BFGS
        from scipy.optimize import minimize  # (imported when used: a refused run needs no scipy)

        r = minimize(objective.value, theta0, jac=objective.gradient, method=self.method, options=opts,
                     callback=_scipy_callback(accepted))
        return r.x, int(r.nit), bool(r.success), str(r.message)


class MleBfgs(ScipyQuasiNewton):
    name, method = "bfgs", "BFGS"
    description = "scipy BFGS on -loglik with the exact score"


class MleLbfgsb(ScipyQuasiNewton):
    name, method = "l-bfgs-b", "L-BFGS-B"
    description = "scipy L-BFGS-B on -loglik with the exact score"


class Bhhh(MleOptimizer):
    """Newton-like steps d = B^-1 (mean score), B the OPG mean (Berndt, Hall, Hall, Hausman), with
    Armijo backtracking (halving) on the log-likelihood; one evaluation per trial point."""

    name = "bhhh"
    description = "Newton-like steps with the OPG as curvature and a backtracking line search"
    needs_opg = True
    ARMIJO, HALVINGS = 1e-4, 40

    def minimize(self, objective, theta0, gtol, max_iter, accepted=None, stall: float | None = None):
        """stall: stop (unconverged) after two steps in a row that each leave max |mean score|
        above stall times the last one: the OPG is not -H there and BHHH converges too slowly
        to be worth its evaluations (the polish then hands over to Newton steps on the Hessian)."""
        theta = np.asarray(theta0, dtype=np.float64).copy()
        f = objective.value(theta)
        last, slow = None, 0
        for it in range(max_iter):
            g = objective.gradient(theta)
            size = float(np.max(np.abs(g)))
            if size <= gtol:
                return theta, it, True, "mean score below gtol"
            if stall is not None and last is not None:
                slow = slow + 1 if size > stall * last else 0
                if slow >= 2:
                    return theta, it, False, "stalled"
            last = size
            try:
                d = -np.linalg.solve(objective.opg(theta), g)
            except np.linalg.LinAlgError:
                return theta, it, False, "the OPG is singular"
            slope, t = float(g @ d), 1.0
            rounding = 1e4 * np.finfo(float).eps * max(1.0, abs(f))
            if -slope <= rounding:
                # the decrease predicted is below f's rounding: a line search on f sees only noise
                # there, so the full step is taken on the gradient's word, provided f stays within
                # its rounding (where the OPG is near singular, d can be huge: the modechoice mixed
                # logit at 200 draws had a step of 4e51 that took -loglik from 173 to 2e54)
                ft = objective.value(theta + d)
                if not ft <= f + rounding:  # (halving such a step would spend evaluations on noise)
                    return theta, it, False, "a step below the log-likelihood's rounding made it worse"
                theta, f = theta + d, ft
                if accepted is not None:
                    accepted(theta)
                continue
            for _ in range(self.HALVINGS):
                trial = theta + t * d
                ft = objective.value(trial)
                if ft <= f + self.ARMIJO * t * slope:
                    break
                t /= 2
            else:
                return theta, it, False, "the line search found no increase of the log-likelihood"
            theta, f = trial, ft
            if accepted is not None:
                accepted(theta)
        ok = np.max(np.abs(objective.gradient(theta))) <= gtol
        return theta, max_iter, bool(ok), "mean score below gtol" if ok else f"stopped after {max_iter} iterations"


class TrustNewton(MleOptimizer):
    name = "trust-newton"
    description = "scipy trust-exact with the Hessian (exact, or forward differences of the exact score: P evaluations each)"

    def minimize(self, objective, theta0, gtol, max_iter, accepted=None):
        from scipy.optimize import minimize

        r = minimize(objective.value, theta0, jac=objective.gradient, hess=objective.hessian, method="trust-exact",
                     options={"gtol": gtol, "maxiter": max_iter}, callback=_scipy_callback(accepted))
        return r.x, int(r.nit), bool(r.success), str(r.message)


MLE_OPTIMIZERS: Registry[MleOptimizer] = Registry("optimizer", [MleBfgs(), MleLbfgsb(), Bhhh(), TrustNewton()])
DEFAULT_OPTIMIZER = "bfgs"


@dataclass
class Maximized:
    """Where an optimizer and the BHHH polish left the log-likelihood: b, theta = D b, the
    objective (its Hessian memo), the oracle (its evaluations), iterations and the message.
    iterations and polish_steps count those of the runs resumed too; opt_evaluations only
    this run's."""

    b: np.ndarray
    theta: np.ndarray
    D: np.ndarray
    n: int
    objective: LikelihoodObjective
    oracle: LikelihoodOracle
    iterations: int
    optimizer: str
    opt_message: str
    opt_evaluations: int
    polish_steps: int
    moved: float
    resumed_at: int | None = None  # the optimizer's iterations before this run, when it resumed them
    resumed_polish: bool = False  # this run resumed the polish: its optimizer ran in the runs before
    progress: "_Progress | None" = None  # the run's state as it went (history, counts)


class _Progress:
    """The run's MleState as it goes: every accepted iteration appends to the history and
    hands the state to `on_state` (the reporter's checkpoint)."""

    def __init__(self, objective: LikelihoodObjective, D: np.ndarray, state: "MleState | None", on_state,
                 on_iteration=None):
        self.objective, self.D, self.on_state = objective, D, on_state
        self.on_iteration = on_iteration  # reporter.iteration: GMM-shaped IterationRecords (progress)
        self.before = state.evaluations if state else 0
        self.history: list[dict] = list(state.history) if state else []
        self.iterations = state.iterations if state else 0
        self.polish_steps = state.polish_steps if state else 0
        self.message = state.message if state else ""
        self.t0 = time.perf_counter()
        self.last_theta: np.ndarray | None = None  # the previous accepted point (the start at first)

    @property
    def evaluations(self) -> int:
        return self.before + self.objective.oracle.evaluations

    def state(self, phase: str, theta: np.ndarray, message: str | None = None) -> MleState:
        return MleState(params=np.asarray(theta, dtype=np.float64) / self.D, D=self.D, phase=phase,
                        iterations=self.iterations, polish_steps=self.polish_steps, evaluations=self.evaluations,
                        history=self.history, message=self.message if message is None else message)

    def accepted(self, phase: str):
        def record(theta: np.ndarray) -> None:
            # the accepted point was just evaluated: the oracle's memo answers (no evaluation)
            f, g = self.objective.value(theta), self.objective.gradient(theta)
            if phase == "optimizer":
                self.iterations += 1
            else:
                self.polish_steps += 1
            step = None if self.last_theta is None else float(np.linalg.norm(theta - self.last_theta))
            self.last_theta = np.array(theta, dtype=np.float64)
            self.history.append({"phase": phase, "iteration": self.iterations if phase == "optimizer" else self.polish_steps,
                                 "objective": float(f * self.objective.n), "max_abs_score": float(np.max(np.abs(g))),
                                 "step_norm": step, "evaluations": self.evaluations,
                                 "seconds": time.perf_counter() - self.t0, "params": (np.asarray(theta) / self.D).tolist()})
            if self.on_iteration is not None:
                from estpipe.estimation.optimizers import IterationRecord

                self.on_iteration(IterationRecord(
                    step=1, iteration=self.iterations + self.polish_steps, objective=float(f * self.objective.n),
                    grad_norm=float(np.max(np.abs(g))), step_norm=math.nan if step is None else step,
                    seconds=time.perf_counter() - self.t0, evaluations=self.evaluations,
                    params=(np.asarray(theta) / self.D).tolist(), objective_name="-loglik"))
            if self.on_state is not None:
                self.on_state(self.state(phase, theta))
        return record


def maximize(source, settings: MleSettings, x0: np.ndarray, clustered: bool, state: MleState | None = None,
             on_state=None, on_iteration=None) -> Maximized:
    """Maximize the log-likelihood `source` sums from x0: the settings' optimizer in standardized
    parameters, then BHHH polish steps (one evaluation each: the OPG comes with every
    evaluation, and at the maximum it is ~ -H, so from the optimizer's point they converge fast).

    state: a resumed run's MleState: the optimizer restarts from its parameters with its D (a
    quasi-Newton method's curvature approximation starts afresh), or, when it was polishing, the
    polish does. on_state(MleState) receives the state after every accepted iteration and when
    the optimizer ends; on_iteration(IterationRecord) after every accepted iteration (progress).
    Raises UserError when the log-likelihood is not finite at the start."""
    oracle = LikelihoodOracle(source, clustered)
    b0 = np.asarray(x0 if state is None else state.params, dtype=np.float64)
    s0 = oracle.sums(b0)
    if not (math.isfinite(s0.loglik) and np.all(np.isfinite(s0.score))):
        where = "the start" if state is None else "the checkpoint's parameters"
        raise UserError(f"the log-likelihood is not finite at {where} ({s0.loglik!r}); give {term('start')} with "
                        "smaller values")
    n = s0.n_units
    if state is None:
        rms = np.sqrt(np.diag(s0.opg) / n)
        D = np.where(np.isfinite(rms) & (rms > 1e-300), rms, 1.0)  # theta = D b
    else:
        D = np.asarray(state.D, dtype=np.float64)
    optimizer = MLE_OPTIMIZERS.get(settings.optimizer)
    objective = LikelihoodObjective(oracle, D, n, needs_opg=optimizer.needs_opg)
    objective.exact = s0.has_hessian
    progress = _Progress(objective, D, state, on_state, on_iteration)
    theta = b0 * D
    progress.last_theta = theta
    resumed_at = state.iterations if state is not None and state.phase == "optimizer" else None
    if state is None or state.phase == "optimizer":
        theta, _, _, opt_message = optimizer.minimize(objective, theta, max(settings.tol, 1e-7), settings.max_iter,
                                                      progress.accepted("optimizer"))
        theta = np.asarray(theta, dtype=np.float64)
        progress.message = opt_message
        if on_state is not None:
            on_state(progress.state("polish", theta))
    opt_evaluations = oracle.evaluations
    before = theta
    objective.needs_opg = True
    theta, _, _, _ = Bhhh().minimize(objective, theta, max(settings.tol, 1e-11), POLISH_STEPS,
                                     progress.accepted("polish"), stall=POLISH_STALL)
    objective.needs_opg = False  # the Hessian's and the chord steps' evaluations need no OPG
    theta = np.asarray(theta, dtype=np.float64)
    fit = Maximized(b=theta / D, theta=theta, D=D, n=n, objective=objective, oracle=oracle,
                    iterations=progress.iterations, optimizer=optimizer.name, opt_message=progress.message,
                    opt_evaluations=opt_evaluations, polish_steps=progress.polish_steps,
                    moved=float(np.max(np.abs(theta - before))), resumed_at=resumed_at,
                    resumed_polish=state is not None and state.phase == "polish", progress=progress)
    return fit


def simulated_start(source, problem, model, settings: MleSettings, clustered: bool,
                    reporter: Reporter | None = None) -> np.ndarray:
    """The default start of a simulated model (the mixed logit) by MLE: its first K parameters
    from the logit, which is the model with every spread at 0 (fitted on the same evaluator
    with the spreads held at 0, where an evaluation needs no draws but their mean: cheap), the
    spreads at the model's default (sds 0.5). From b = 0 with sds 0.5 in the data's own units
    (dollars, minutes) the simulated likelihood is flat in the sds and the first iterations are
    wasted; the logit fit is the standard start (Train, section 10.5; xlogit, Biogeme do the same
    by hand)."""
    from estpipe.estimation.gmm import FixedParameters

    K = problem.K
    x0 = np.asarray(model.start(K), dtype=np.float64)
    fixed = x0.copy()
    fixed[K:] = 0.0
    free = np.arange(K)
    fit = maximize(FixedParameters(source, fixed, free), MleSettings(tol=max(settings.tol, 1e-8),
                                                                     max_iter=settings.max_iter), fixed[:K], clustered)
    x0[:K] = fit.b
    if reporter is not None:
        reporter.log(f"start: the coefficients of a logit fit ({count(fit.oracle.evaluations, 'evaluation')}, loglik "
                     f"{fit.oracle.sums(fit.b).loglik:.6g}), every spread at its default")
    return x0


CHORD_STEPS = 20
CHORD_REFRESH = 1e-4  # theta moved by the chord steps beyond which the Hessian is made again


def _chord_steps(objective: LikelihoodObjective, theta: np.ndarray, H: np.ndarray, target: float):
    """Newton steps d = -H^-1 g with one fixed Hessian H (of -loglik/n in theta) from theta, while
    max |g| > target and each step lowers max |g| or the objective; (theta, steps, distance)."""
    start = theta
    g = objective.gradient(theta)
    steps = 0
    if not np.all(np.isfinite(H)) or np.max(np.abs(g)) <= target:
        return theta, 0, 0.0
    try:
        np.linalg.cholesky(H)  # a minimum: H positive definite, else no Newton step is safe
    except np.linalg.LinAlgError:
        return theta, 0, 0.0
    f = objective.value(theta)
    for _ in range(CHORD_STEPS):
        trial = theta - np.linalg.solve(H, g)
        ft, gt = objective.value(trial), objective.gradient(trial)
        if not (np.isfinite(ft) and (np.max(np.abs(gt)) < np.max(np.abs(g)) or ft < f)):
            break
        theta, f, g, steps = trial, ft, gt, steps + 1
        if np.max(np.abs(g)) <= target:
            break
    return theta, steps, float(np.max(np.abs(theta - start)))


def step_history(history: list[dict]) -> list[dict]:
    """The accepted iterations (MleState.history, with those before a resume) as the results
    file's steps[].history keeps them (GMM's keys, gmm.step_history): iteration (numbered on
    through the polish), phase (optimizer or polish), objective (-loglik), gradient_norm (max
    |mean score| in theta), step_norm (2-norm in theta; None for the first after a start or a
    resume), evaluations (the run's count so far, with the runs resumed), seconds (since the run
    that made it started)."""
    return [{"iteration": i + 1, "phase": h["phase"], "objective": h["objective"], "gradient_norm": h["max_abs_score"],
             "step_norm": h.get("step_norm"), "evaluations": h["evaluations"], "seconds": h["seconds"]}
            for i, h in enumerate(history)]


def check_chosen(problem) -> None:
    """A likelihood needs the chosen rows: a file without them is one UserError line."""
    if not problem.has_chosen:
        raise UserError(f"{problem.path}: the file has no chosen rows; {term('estimator')} mle needs them: write the "
                        f"file with estpipe load {cli_flag('choice_col')} COLUMN (the 0/1 column of the chosen "
                        "alternative), or use the default GMM estimator")


def estimate_mle(source, problem, model, settings: MleSettings, x0: np.ndarray, clustered: bool,
                 reporter: Reporter | None = None, state: MleState | None = None) -> MleEstimate:
    """Maximum likelihood of `model` on the data `source` sums over (see the module docstring).

    problem: the data's facts (K, x_names, has_chosen, has_cluster, has_panel); clustered: robust
    standard errors from the file's cluster sums; state: a resumed run's MleState (x0 is then
    unused; a finished one is not optimized again: only the inference at its estimate is made).
    Raises UserError for data without chosen rows, a start that is not finite, or a likelihood
    flat at the estimate."""
    reporter = reporter or Reporter()
    check_chosen(problem)
    names = list(model.param_names(problem.x_names))
    simulated = bool(getattr(model, "simulated", False))
    reporter.log(f"maximum likelihood: {MLE_OPTIMIZERS.get(settings.optimizer).name} on the exact score, then BHHH "
                 f"polish steps and one Hessian" + (f"; {model.draws.R} {model.draws.kind} draws per decision maker"
                                                    if getattr(model, "simulated", False) else ""))
    finished = state is not None and state.phase == "finished"
    if finished:
        # GMM's finished checkpoint likewise goes straight to the inference at its estimate
        oracle = LikelihoodOracle(source, clustered)
        D = np.asarray(state.D, dtype=np.float64)
        s0 = oracle.sums(state.params)
        objective = LikelihoodObjective(oracle, D, s0.n_units)
        objective.exact, n = s0.has_hessian, s0.n_units
        theta = state.params * D
        nit, newton = state.iterations, state.polish_steps
        progress = None
    else:
        fit = maximize(source, settings, x0, clustered, state=state, on_state=reporter.checkpoint,
                       on_iteration=reporter.iteration)
        objective, oracle, D, n, theta = fit.objective, fit.oracle, fit.D, fit.n, fit.theta
        nit, newton, progress = fit.iterations, fit.polish_steps, fit.progress
    # ONE Hessian at the final estimate for inference (P evaluations, 1 when exact; none when trust-newton
    # has it there).
    reuse_note = " (the optimizer's own at the end)" if objective.hessian_known(theta) else ""
    # --se bhhh reports the inverse OPG alone (as xlogit and Apollo's BHHH do): no Hessian, so
    # neither classical nor robust errors, and no chord steps
    opg_only = settings.se == "bhhh"
    H = None if opg_only else objective.hessian(theta)
    target = max(settings.tol, 1e-9)
    # Where BHHH's polish stalls (the OPG is not -H: a misspecified or poorly fitting model, as a
    # mixed logit on 210 people), Newton steps with this one Hessian (chord steps, one
    # evaluation each) finish the job; the Hessian is made anew only if they move theta by more
    # than CHORD_REFRESH.
    chord, chord_moved = 0, 0.0
    if not finished and H is not None:
        theta, chord, chord_moved = _chord_steps(objective, theta, H, target)
        if chord_moved > CHORD_REFRESH:
            H = objective.hessian(theta)
    b = theta / D
    s = oracle.sums(b)
    g_theta = float(np.max(np.abs(s.score / D / n)))
    converged = bool(np.isfinite(s.loglik) and g_theta <= target)
    if finished:
        message = state.message
    else:
        chord_note = f"; {count(chord, 'Newton step')} on it moving {chord_moved:.2g}" if chord else ""
        evaluations = count(fit.opt_evaluations, 'evaluation')
        counts = (f"{nit} iterations before resuming" if fit.resumed_polish else
                  f"{nit} iterations, {evaluations}" if fit.resumed_at is None else
                  f"{nit} iterations, {fit.resumed_at} of them before resuming; {evaluations} in this run")
        message = (f"{fit.optimizer}: {fit.opt_message} ({counts}); "
                   f"{count(newton, 'BHHH polish step')} moving {fit.moved:.2g} in theta; "
                   + ("no Hessian (--se bhhh)" if opg_only else
                      f"Hessian ({objective.hessian_rule}) {count(objective.hessian_evaluations, 'evaluation')}"
                      f"{reuse_note}{chord_note}")
                   + f"; max |mean score| {g_theta:.2g} in theta")
        reporter.checkpoint(progress.state("finished", theta, message))
    reporter.log(("converged: " if converged else "did NOT converge: ") + message)

    use_clusters = clustered and s.opg_cluster is not None
    if H is not None:
        # H is d^2(-loglik/n)/d theta^2; d score/d b = -n D H D
        classical = _inverse_negative(-n * H * np.outer(D, D), names, "the estimate", simulated)
        B = s.opg_cluster if use_clusters else s.opg
        robust = classical @ B @ classical
        robust = (robust + robust.T) / 2
    units = "clusters" if use_clusters else ("panel units" if problem.has_panel else "sets")
    robust_name = "robust" if units == "sets" else "clustered"
    se_type = robust_name if settings.se in (None, "robust") else settings.se
    signs = model.canonical_signs(b)
    b = b * signs
    flip = np.outer(signs, signs)
    covariances = {} if H is None else {"classical": classical * flip, robust_name: robust * flip}
    if se_type == "bhhh":  # the inverse OPG over units (BHHH's curvature), the information identity's other side
        covariances["bhhh"] = _inverse_negative(-s.opg, names, "the estimate (its OPG)", simulated) * flip
    P, n_units = len(b), int(s.n_units)
    ll, null = float(s.loglik), float(s.loglik_null)
    likelihood = {
        "loglik_null": null, "rho_squared": 1.0 - ll / null if null else None,
        "rho_squared_adj": 1.0 - (ll - P) / null if null else None,
        "aic": 2 * P - 2 * ll, "bic": P * math.log(n_units) - 2 * ll, "n_units": n_units,
        "n_draws": model.draws.R if simulated else None, "draws_kind": model.draws.kind if simulated else None,
    }
    derived = delta_method(model.derived, b, covariances[se_type], model.derived_nulls())
    notes = model.derived_notes({d.name: d.estimate for d in derived})
    if simulated:
        notes.append(f"simulated likelihood with {model.draws.R} {model.draws.kind} draws per decision maker: biased "
                     "at a fixed number of draws (consistent as R grows faster than the square root of the units), "
                     "and its standard errors ignore the simulation (Train 2009, section 10.5)")
    return MleEstimate(
        params=b, param_names=names, covariance=covariances[se_type], covariances=covariances, se_type=se_type,
        n_clusters=None if units == "sets" else int(s.n_clusters if use_clusters else n_units),
        objective=-ll, loglik=ll, likelihood=likelihood, converged=converged, message=message,
        steps=[StepRecord(step=1, weighting="mle", params=b.tolist(), objective=-ll, iterations=int(nit) + newton,
                          evaluations=oracle.evaluations, converged=converged, message=message,
                          history=step_history(state.history if finished else progress.history))],
        evaluations=oracle.evaluations, hessian_evaluations=objective.hessian_evaluations, derived=derived,
        notes=notes, units=units)
