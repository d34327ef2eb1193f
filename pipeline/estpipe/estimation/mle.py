"""Maximum likelihood, pure (DESIGN.md, "Maximum likelihood (first slice)").

    estimate_mle(source, problem, model, settings, x0, clustered, reporter=None) -> MleEstimate

`source` answers the kernel's "likelihood" request summed over the data (LikelihoodSums: the
log-likelihood, the score sum and the OPG per independent unit and per cluster); this module
starts no back end and knows no flag. The log-likelihood is maximized by BFGS on the exact
gradient in standardized parameters theta = D b (D_k = the root mean square of unit scores at the
start, so the optimizer sees no data units), then polished by Newton steps on the Hessian, which
is the central difference of the exact gradient. One Hessian gives the classical standard errors
(-H)^-1 and, with the OPG B, the robust sandwich H^-1 B H^-1 (clustered: B from cluster sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from estpipe.errors import UserError, term
from estpipe.estimation.gmm import Reporter, StepRecord
from estpipe.estimation.inference import delta_method
from estpipe.kernel.request import Request
from estpipe.text import count

HESSIAN_STEP = float(np.finfo(float).eps ** (1 / 3))  # central differences: error ~ step^2
NEWTON_STEPS = 8


@dataclass
class MleSettings:
    """tol: BFGS's gtol on the mean standardized score and the Newton polish's step size in
    theta; max_iter: BFGS iterations."""

    tol: float = 1e-10
    max_iter: int = 200


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
    weight: None = None
    j_test: None = None
    gradient_rule: str = "dual blocks of the log-probabilities (scores)"
    derived: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    units: str = "sets"


class LikelihoodOracle:
    """The whole data's LikelihoodSums at b, memoized on the last parameter vector, counting
    evaluations (map/reduces)."""

    def __init__(self, source, clustered: bool):
        self.source, self.clustered = source, clustered
        self.evaluations = 0
        self._last = None

    def sums(self, b: np.ndarray):
        b = np.asarray(b, dtype=np.float64)
        if self._last is not None and np.array_equal(self._last[0], b):
            return self._last[1]
        s = self.source.evaluate(Request.for_likelihood(b.copy(), clustered=self.clustered))
        self.evaluations += 1
        self._last = (b.copy(), s)
        return s


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


def _inverse_negative(H: np.ndarray, names: list[str], where: str) -> np.ndarray:
    """(-H)^-1, or a UserError naming the parameters the likelihood does not identify."""
    w, V = np.linalg.eigh(-H)
    top = float(np.max(np.abs(w), initial=0.0))
    if not np.all(np.isfinite(w)) or w.size and w.min() <= 1e-12 * top or top == 0.0:
        k = int(np.argmin(w)) if np.all(np.isfinite(w)) else 0
        worst = np.argsort(-np.abs(V[:, k]))[:3]
        raise UserError(f"the log-likelihood is flat or not concave at {where} (smallest curvature {w.min():.3g}, "
                        f"largest {top:.3g}): the data do not identify {', '.join(names[i] for i in worst)}; drop or "
                        f"fix those parameters, or give {term('start')} nearer the estimate")
    inv = (V / w) @ V.T
    return (inv + inv.T) / 2


def estimate_mle(source, problem, model, settings: MleSettings, x0: np.ndarray, clustered: bool,
                 reporter: Reporter | None = None) -> MleEstimate:
    """Maximum likelihood of `model` on the data `source` sums over (see the module docstring).

    problem: the data's facts (K, x_names, has_chosen, has_cluster, has_panel); clustered: robust
    standard errors from the file's cluster sums. Raises UserError for data without chosen rows,
    a start that is not finite, or a likelihood flat at the estimate."""
    reporter = reporter or Reporter()
    if not problem.has_chosen:
        raise UserError(f"{problem.path}: the file has no chosen rows; maximum likelihood needs them: write the file "
                        "with estpipe load --chosen COLUMN (or use the default GMM estimator)")
    names = list(model.param_names(problem.x_names))
    oracle = LikelihoodOracle(source, clustered)
    b0 = np.asarray(x0, dtype=np.float64)
    s0 = oracle.sums(b0)
    if not (math.isfinite(s0.loglik) and np.all(np.isfinite(s0.score))):
        raise UserError(f"the log-likelihood is not finite at the start ({s0.loglik!r}); give {term('start')} with "
                        "smaller values")
    n = s0.n_units
    rms = np.sqrt(np.diag(s0.opg) / n)
    D = np.where(np.isfinite(rms) & (rms > 1e-300), rms, 1.0)  # theta = D b

    def f(theta):
        s = oracle.sums(theta / D)
        return -s.loglik / n if math.isfinite(s.loglik) else np.inf

    def grad(theta):
        return -oracle.sums(theta / D).score / D / n

    reporter.log(f"maximum likelihood: bfgs on the exact score, then Newton steps; {count(n, 'unit')}")
    res = minimize(f, b0 * D, jac=grad, method="BFGS",
                   options={"gtol": max(settings.tol, 1e-7), "maxiter": settings.max_iter})
    b = res.x / D
    score = lambda x: oracle.sums(x).score  # noqa: E731

    def steps_at(x):
        return HESSIAN_STEP * np.maximum(1.0, np.abs(x * D)) / D

    # Newton polish on the same Hessian inference uses: quadratic convergence from BFGS's point
    newton, moved = 0, np.inf
    H = hessian(score, b, steps_at(b))
    while newton < NEWTON_STEPS and moved > settings.tol:
        step = _inverse_negative(H, names, "the BFGS estimate") @ oracle.sums(b).score
        trial = b + step
        if not oracle.sums(trial).loglik >= oracle.sums(b).loglik - 1e-12 * abs(oracle.sums(b).loglik):
            break
        b, moved, newton = trial, float(np.max(np.abs(step * D))), newton + 1
        H = hessian(score, b, steps_at(b))
    s = oracle.sums(b)
    g_theta = float(np.max(np.abs(s.score / D / n)))
    converged = bool(np.isfinite(s.loglik) and (moved <= settings.tol or g_theta <= max(settings.tol, 1e-9)))
    message = (f"bfgs: {res.message} ({res.nit} iterations); {count(newton, 'Newton step')}, last step "
               f"{moved:.2g} in theta, max |mean score| {g_theta:.2g} in theta")
    reporter.log(("converged: " if converged else "did NOT converge: ") + message)

    classical = _inverse_negative(H, names, "the estimate")
    use_clusters = clustered and s.opg_cluster is not None
    B = s.opg_cluster if use_clusters else s.opg
    robust = classical @ B @ classical
    robust = (robust + robust.T) / 2
    units = "clusters" if use_clusters else ("panel units" if problem.has_panel else "sets")
    se_type = "robust" if units == "sets" else "clustered"
    signs = model.canonical_signs(b)
    b = b * signs
    flip = np.outer(signs, signs)
    covariances = {"classical": classical * flip, se_type: robust * flip}
    P, n_units = len(b), int(s.n_units)
    ll, null = float(s.loglik), float(s.loglik_null)
    likelihood = {
        "loglik_null": null, "rho_squared": 1.0 - ll / null if null else None,
        "rho_squared_adj": 1.0 - (ll - P) / null if null else None,
        "aic": 2 * P - 2 * ll, "bic": P * math.log(n_units) - 2 * ll, "n_units": n_units,
    }
    derived = delta_method(model.derived, b, covariances[se_type], model.derived_nulls())
    return MleEstimate(
        params=b, param_names=names, covariance=covariances[se_type], covariances=covariances, se_type=se_type,
        n_clusters=None if units == "sets" else int(s.n_clusters if use_clusters else n_units),
        objective=-ll, loglik=ll, likelihood=likelihood, converged=converged, message=message,
        steps=[StepRecord(step=1, weighting="mle", params=b.tolist(), objective=-ll, iterations=int(res.nit) + newton,
                          evaluations=oracle.evaluations, converged=converged, message=message)],
        evaluations=oracle.evaluations, derived=derived,
        notes=model.derived_notes({d.name: d.estimate for d in derived}), units=units)
