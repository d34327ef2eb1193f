"""The optimizer loop: scipy optimizers on Q = g'Wg, one map/reduce per parameter vector.

Every value the optimizer asks for is a whole map/reduce over the data, so `MomentOracle` caches
the last few MomentSums by parameter vector (scipy's MemoizeJac idea): least_squares asks for the
residual L'g and its Jacobian L'G at the same point in separate calls, and both come from one
evaluation of [g | G].
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from estpipe.errors import term
from estpipe.estimation.scaling import Scaling
from estpipe.registry import Registry
from estpipe.estimation.weighting import WeightMatrix
from estpipe.kernel import MomentSums
from estpipe.kernel.request import Request
from estpipe.text import count

# least_squares' gtol: its test is on the inf-norm of J'r = G'Wg, which is ~0 only at the optimum
# and whose scale depends on the data, so it is kept far below what xtol and ftol (--tol) reach
# and those decide; it still ends runs that land exactly on a zero gradient.
GAUSS_NEWTON_GTOL = 1e-15
_CACHE_SIZE = 8


class MomentOracle:
    """Memoized map/reduces over an Evaluator. `evaluations` counts map/reduces actually run.

    scaling: the run's Scaling (seed and moment scales go to every evaluation; finite-difference
    steps are on its standardized parameters), or None for the data's own units."""

    def __init__(self, evaluator, clustered: bool, scaling: Scaling | None = None):
        self.evaluator = evaluator
        self.clustered = clustered
        self.scaling = scaling
        self.evaluations = 0
        self._sums: OrderedDict[bytes, tuple[bool, bool, MomentSums]] = OrderedDict()
        self._pullbacks: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def _request(self, params, jacobian: bool, covariance: bool) -> Request:
        sc = self.scaling
        scales = {} if sc is None else {"seed_scale": sc.seed, "moment_scale": sc.moments, "fd_steps": sc.fd_steps(params)}
        return Request.of(params, jacobian, covariance, clustered=self.clustered, **scales)

    def sums(self, params, jacobian: bool = True, covariance: bool = False) -> MomentSums:
        """MomentSums at params with at least what is asked for. When the cache already holds one
        part at these params (typically the optimizer's last [g | G] at b1 or at the final
        estimate, and now S is wanted), only the missing part is computed: a covariance pass
        without the Jacobian costs ~40% of one with it, and the Jacobian GEMM is not repeated."""
        params = np.ascontiguousarray(params, dtype=np.float64)
        key = params.tobytes()
        hit = self._sums.get(key)
        if hit is not None and hit[0] >= jacobian and hit[1] >= covariance:
            self._sums.move_to_end(key)
            return hit[2]
        if hit is not None:
            # hit lacks one part; ask only for that part, keep what hit has
            need_jacobian, need_covariance = jacobian and not hit[0], covariance and not hit[1]
            part = self.evaluator.evaluate(self._request(params, need_jacobian, need_covariance))
            out = _merge(hit[2], part)
            jacobian, covariance = hit[0] or need_jacobian, hit[1] or need_covariance
        else:
            out = self.evaluator.evaluate(self._request(params, jacobian, covariance))
        self.evaluations += 1
        self._sums[key] = (jacobian, covariance, out)
        self._sums.move_to_end(key)
        if len(self._sums) > _CACHE_SIZE:
            self._sums.popitem(last=False)
        return out

    def pullback(self, params, v) -> np.ndarray:
        params = np.ascontiguousarray(params, dtype=np.float64)
        v = np.ascontiguousarray(v, dtype=np.float64)
        key = params.tobytes() + v.tobytes()
        if key not in self._pullbacks:
            self._pullbacks[key] = self.evaluator.pullback_of(self._request(params, False, False), v)
            self.evaluations += 1
            if len(self._pullbacks) > _CACHE_SIZE:
                self._pullbacks.popitem(last=False)
        return self._pullbacks[key]


def _merge(a: MomentSums, b: MomentSums) -> MomentSums:
    """Two evaluations at the same params: [g | G] from whichever has the Jacobian (the wider gG),
    the covariance sums (hh, nh, nn, units, loglik) from whichever has them."""
    gG = a.gG if a.gG.shape[1] >= b.gG.shape[1] else b.gG
    c = a if a.hh is not None else b
    return MomentSums(n_sets=a.n_sets, gG=gG, hh=c.hh, nh=c.nh, nn=c.nn, n_units=c.n_units, loglik=c.loglik,
                      moment_scale=c.moment_scale)


@dataclass
class OptimizeResult:
    """scipy's names: x (P,) the estimate in the model's parameters, fun (Q = g'Wg at x, in the
    data's units), jac (the gradient of the normalized objective Q / q in the standardized
    parameters theta, (P,)), success, status, message, nit (iterations), nfev (map/reduces of
    this run); theta (P,) the estimate in standardized parameters."""

    x: np.ndarray
    fun: float
    jac: np.ndarray
    success: bool
    status: int
    message: str
    nit: int
    nfev: int
    theta: np.ndarray | None = None


@dataclass
class IterationRecord:
    """One accepted iteration, as progress and checkpoint history see it: objective Q in the
    data's units, grad_norm the inf-norm of the normalized objective's gradient in standardized
    parameters, step_norm the step's 2-norm in standardized parameters, params in the model's."""

    step: int
    iteration: int
    objective: float
    grad_norm: float
    step_norm: float
    seconds: float
    evaluations: int
    params: list[float] = field(repr=False)
    objective_name: str = "Q"  # what `objective` is, for progress lines: Q (GMM) or -loglik (MLE)

    def to_dict(self) -> dict:
        return {
            "step": self.step, "iteration": self.iteration, "objective": self.objective, "grad_norm": self.grad_norm,
            "step_norm": self.step_norm, "seconds": self.seconds, "evaluations": self.evaluations, "params": self.params,
        }


class GmmObjective:
    """Q(b) = g'Wg as the optimizer sees it: in standardized parameters theta = D b, the residual
    r(theta) = A R g (W's whitening, normalized so that ||r||^2 = Q / q), its Jacobian, and the
    gradient of ||r||^2, through a MomentOracle."""

    def __init__(self, oracle: MomentOracle, W: WeightMatrix, derivatives: str, scaling: Scaling):
        self.oracle, self.W, self.derivatives, self.scaling = oracle, W, derivatives, scaling

    def residual(self, theta) -> np.ndarray:
        s = self.oracle.sums(self.scaling.b(theta), jacobian=True)
        return self.W.whiten(self.scaling.g_scaled(s.g))

    def residual_jacobian(self, theta) -> np.ndarray:
        s = self.oracle.sums(self.scaling.b(theta), jacobian=True)
        return self.W.whiten(self.scaling.jacobian_theta(s.G))

    def objective(self, theta) -> float:
        """Q in the data's units at theta (from the cached evaluation)."""
        s = self.oracle.sums(self.scaling.b(theta), jacobian=False)
        return self.W.objective(self.scaling.g_scaled(s.g))

    def value_and_gradient(self, theta) -> tuple[float, np.ndarray]:
        """||r||^2 and its gradient in theta (P,)."""
        sc = self.scaling
        b = sc.b(theta)
        if self.derivatives == "adjoint":
            # reverse mode: g first, then one pullback n G'v with v = R A' r: two map/reduces, no G formed
            s = self.oracle.sums(b, jacobian=False)
            r = self.W.whiten(sc.g_scaled(s.g))
            if not np.all(np.isfinite(r)):
                return np.inf, np.zeros_like(theta)
            v = sc.moments * self.W.whiten_transpose(r)
            grad = (2.0 / s.n_sets) * self.oracle.pullback(b, v) * (sc.seed / sc.params)
            return float(r @ r), grad
        s = self.oracle.sums(b, jacobian=True)
        r = self.W.whiten(sc.g_scaled(s.g))
        J = self.W.whiten(sc.jacobian_theta(s.G))
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(J))):
            return np.inf, np.zeros_like(theta)
        return float(r @ r), 2.0 * (J.T @ r)


def _at_rounding_floor(r, message: str) -> tuple[bool, str]:
    """Whether a quasi-Newton run that stopped because its line search could no longer decrease
    the objective (BFGS "precision loss", L-BFGS-B "ABNORMAL") has in fact converged: when the
    decrease its own model still predicts, grad' H^-1 grad, is below the objective's rounding
    error (taken as 1e4 eps |f|: the objective is a sum over every set, rounded at each term).
    With an over-identified objective whose minimum is not zero, a gradient as small as --tol
    asks can be out of float64's reach (the decrease it stands for is below the last digits of
    the objective); the estimate is then as good as float64 allows."""
    hess_inv = getattr(r, "hess_inv", None)
    if hess_inv is None or not np.all(np.isfinite(r.jac)):
        return False, message
    grad = np.asarray(r.jac, dtype=np.float64)
    decrease = float(grad @ (hess_inv @ grad))
    floor = 1e4 * np.finfo(float).eps * max(1.0, abs(float(r.fun)))
    if 0.0 <= decrease <= floor:
        return True, (f"converged to float64's precision ({message.rstrip('.: ')}: the decrease still predicted, "
                      f"{decrease:.1e}, is at the objective's rounding level {floor:.1e})")
    return False, message


class Optimizer:
    """One optimizer (`optimizer=`): minimize(objective, theta0, tol, max_iter, accepted) ->
    (theta, success, status, message). `needs_jacobian`: it needs the Jacobian of a residual
    (least squares), not only a gradient; `accepted(theta)` is called after every accepted
    iteration and raises StopIteration to stop."""

    name = ""
    description = ""
    needs_jacobian = False

    def minimize(self, objective, theta0, tol: float, max_iter: int, accepted):
        raise NotImplementedError


class GaussNewton(Optimizer):
    name = "gauss-newton"
    description = "scipy least_squares on the whitened residual L'g, Jacobian L'G; tol is its xtol and ftol"
    needs_jacobian = True

    def minimize(self, objective, theta0, tol, max_iter, accepted):
        from scipy.optimize import least_squares  # (imported when used: a refused run needs no scipy)

        r = least_squares(
            objective.residual, theta0, jac=objective.residual_jacobian, method="trf", xtol=tol, ftol=tol,
            gtol=GAUSS_NEWTON_GTOL, max_nfev=10 * max_iter + 10,
            callback=lambda intermediate_result: accepted(intermediate_result.x),
        )
        if r.status == -2:
            success, message = False, f"stopped after {term('max_iter')} {count(max_iter, 'iteration')} without converging"
        elif r.status == 0:
            success, message = False, f"stopped after {count(r.nfev, 'evaluation')} of the residual without converging"
        else:
            success, message = bool(r.status > 0), str(r.message)
        return r.x, success, int(r.status), message


class QuasiNewton(Optimizer):
    """scipy minimize with the exact gradient; tol is its gtol."""

    method = ""

    def minimize(self, objective, theta0, tol, max_iter, accepted):
        opts = {"gtol": tol, "maxiter": max_iter}
        if self.method == "L-BFGS-B":
            # L-BFGS-B also stops when the objective falls by less than ftol * max(|f|, 1); leave
            # the decision to gtol, as for BFGS.
            opts["ftol"] = np.finfo(float).eps
        from scipy.optimize import minimize

        r = minimize(objective.value_and_gradient, theta0, jac=True, method=self.method, options=opts,
                     callback=lambda intermediate_result: accepted(intermediate_result.x))
        success, message = bool(r.success), str(r.message)
        if not success and r.nit < max_iter:
            success, message = _at_rounding_floor(r, message)
        if not success and r.nit >= max_iter:
            message = f"stopped after {term('max_iter')} {count(max_iter, 'iteration')} without converging ({message})"
        return r.x, success, int(r.status), message


class Bfgs(QuasiNewton):
    name = "bfgs"
    description = "scipy BFGS on Q with the exact gradient"
    method = "BFGS"


class Lbfgsb(QuasiNewton):
    name = "l-bfgs-b"
    description = "scipy L-BFGS-B on Q with the exact gradient"
    method = "L-BFGS-B"


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", [GaussNewton(), Bfgs(), Lbfgsb()])


def run_optimizer(objective: GmmObjective, x0: np.ndarray, optimizer: str | Optimizer, tol: float, max_iter: int,
                  step: int, on_iteration=None) -> OptimizeResult:
    """Minimize Q from x0 (P,), in the model's parameters, with `optimizer` (an OPTIMIZERS entry
    or its name), which works on the standardized parameters theta.

    on_iteration(IterationRecord) is called after every accepted iteration (progress, checkpoint).
    """
    optimizer = OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else optimizer
    oracle, scaling = objective.oracle, objective.scaling
    evals0 = oracle.evaluations
    t0 = time.perf_counter()
    theta0 = scaling.theta(x0)
    state = {"nit": 0, "theta": theta0.copy()}

    def accepted(theta) -> None:
        theta = np.asarray(theta, dtype=np.float64).copy()
        _, grad = objective.value_and_gradient(theta)
        state["nit"] += 1
        rec = IterationRecord(
            step=step, iteration=state["nit"], objective=objective.objective(theta),
            grad_norm=float(np.linalg.norm(grad, np.inf)), step_norm=float(np.linalg.norm(theta - state["theta"])),
            seconds=time.perf_counter() - t0, evaluations=oracle.evaluations - evals0,
            params=scaling.b(theta).tolist(),
        )
        state["theta"] = theta
        if on_iteration is not None:
            on_iteration(rec)
        if state["nit"] >= max_iter and optimizer.needs_jacobian:
            raise StopIteration  # least_squares has no iteration limit of its own

    theta, success, status, message = optimizer.minimize(objective, theta0, tol, max_iter, accepted)
    theta = np.asarray(theta, dtype=np.float64)
    _, grad = objective.value_and_gradient(theta)
    return OptimizeResult(x=scaling.b(theta), fun=objective.objective(theta), jac=grad, success=success,
                          status=status, message=message, nit=state["nit"], nfev=oracle.evaluations - evals0,
                          theta=theta)
