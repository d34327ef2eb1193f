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
from scipy.optimize import least_squares, minimize

from estpipe.execution.evaluator import Evaluator
from estpipe.gmm.weighting import WeightMatrix
from estpipe.kernel import MomentSums

# least_squares' gtol: its test is on the inf-norm of J'r = G'Wg, which is ~0 only at the optimum
# and whose scale depends on the data, so it is kept far below what xtol and ftol (--tol) reach
# and those decide; it still ends runs that land exactly on a zero gradient.
GAUSS_NEWTON_GTOL = 1e-15
_CACHE_SIZE = 8


class MomentOracle:
    """Memoized map/reduces over an Evaluator. `evaluations` counts map/reduces actually run."""

    def __init__(self, evaluator: Evaluator, clustered: bool):
        self.evaluator = evaluator
        self.clustered = clustered
        self.evaluations = 0
        self._sums: OrderedDict[bytes, tuple[bool, bool, MomentSums]] = OrderedDict()
        self._pullbacks: OrderedDict[bytes, np.ndarray] = OrderedDict()

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
            part = self.evaluator.sums(params, jacobian=need_jacobian, covariance=need_covariance,
                                       clustered=self.clustered)
            out = _merge(hit[2], part)
            jacobian, covariance = hit[0] or need_jacobian, hit[1] or need_covariance
        else:
            out = self.evaluator.sums(params, jacobian=jacobian, covariance=covariance, clustered=self.clustered)
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
            self._pullbacks[key] = self.evaluator.pullback(params, v)
            self.evaluations += 1
            if len(self._pullbacks) > _CACHE_SIZE:
                self._pullbacks.popitem(last=False)
        return self._pullbacks[key]


def _merge(a: MomentSums, b: MomentSums) -> MomentSums:
    """Two evaluations at the same params: [g | G] from whichever has the Jacobian (the wider gG),
    the covariance sums (hh, nh, nn, units, loglik) from whichever has them."""
    gG = a.gG if a.gG.shape[1] >= b.gG.shape[1] else b.gG
    c = a if a.hh is not None else b
    return MomentSums(n_sets=a.n_sets, gG=gG, hh=c.hh, nh=c.nh, nn=c.nn, n_units=c.n_units, loglik=c.loglik)


@dataclass
class OptimizeResult:
    """scipy's names: x (P,), fun (Q at x), jac (grad Q at x, (P,)), success, status, message,
    nit (iterations), nfev (map/reduces of this run)."""

    x: np.ndarray
    fun: float
    jac: np.ndarray
    success: bool
    status: int
    message: str
    nit: int
    nfev: int


@dataclass
class IterationRecord:
    """One accepted iteration, as progress and checkpoint history see it."""

    step: int
    iteration: int
    objective: float
    grad_norm: float
    step_norm: float
    seconds: float
    evaluations: int
    params: list[float] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "step": self.step, "iteration": self.iteration, "objective": self.objective, "grad_norm": self.grad_norm,
            "step_norm": self.step_norm, "seconds": self.seconds, "evaluations": self.evaluations, "params": self.params,
        }


class GmmObjective:
    """Q(b) = g'Wg, its residual form L'g and gradient 2 G'Wg, through a MomentOracle."""

    def __init__(self, oracle: MomentOracle, W: WeightMatrix, derivatives: str):
        self.oracle, self.W, self.derivatives = oracle, W, derivatives

    def residual(self, x) -> np.ndarray:
        return self.W.whiten(self.oracle.sums(x, jacobian=True).g)

    def residual_jacobian(self, x) -> np.ndarray:
        return self.W.whiten(self.oracle.sums(x, jacobian=True).G)

    def value_and_gradient(self, x) -> tuple[float, np.ndarray]:
        if self.derivatives == "adjoint":
            # reverse mode: g first, then one pullback n G'(Wg): two map/reduces, no G formed
            s = self.oracle.sums(x, jacobian=False)
            g = s.g
            if not np.all(np.isfinite(g)):
                return np.inf, np.zeros_like(x)
            Wg = self.W.apply(g)
            return float(g @ Wg), (2.0 / s.n_sets) * self.oracle.pullback(x, Wg)
        s = self.oracle.sums(x, jacobian=True)
        g, G = s.g, s.G
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(G))):
            return np.inf, np.zeros_like(x)
        Wg = self.W.apply(g)
        return float(g @ Wg), 2.0 * (G.T @ Wg)


def run_optimizer(objective: GmmObjective, x0: np.ndarray, optimizer: str, tol: float, max_iter: int, step: int,
                  on_iteration=None) -> OptimizeResult:
    """Minimize Q from x0 with `optimizer` ("gauss-newton", "bfgs" or "l-bfgs-b").

    on_iteration(IterationRecord) is called after every accepted iteration (progress, checkpoint).
    """
    oracle = objective.oracle
    evals0 = oracle.evaluations
    t0 = time.perf_counter()
    state = {"nit": 0, "x": np.asarray(x0, dtype=np.float64).copy()}

    def accepted(x) -> None:
        x = np.asarray(x, dtype=np.float64).copy()
        Q, grad = objective.value_and_gradient(x)
        state["nit"] += 1
        rec = IterationRecord(
            step=step, iteration=state["nit"], objective=Q, grad_norm=float(np.linalg.norm(grad, np.inf)),
            step_norm=float(np.linalg.norm(x - state["x"])), seconds=time.perf_counter() - t0,
            evaluations=oracle.evaluations - evals0, params=x.tolist(),
        )
        state["x"] = x
        if on_iteration is not None:
            on_iteration(rec)

    if optimizer == "gauss-newton":
        def callback(intermediate_result):
            accepted(intermediate_result.x)
            if state["nit"] >= max_iter:
                raise StopIteration

        r = least_squares(
            objective.residual, x0, jac=objective.residual_jacobian, method="trf", xtol=tol, ftol=tol,
            gtol=GAUSS_NEWTON_GTOL, max_nfev=10 * max_iter + 10, callback=callback,
        )
        if r.status == -2:
            success, message = False, f"stopped after --max-iter {max_iter} iterations without converging"
        elif r.status == 0:
            success, message = False, f"stopped after {r.nfev} evaluations of the residual without converging"
        else:
            success, message = bool(r.status > 0), str(r.message)
        x = r.x
        status = int(r.status)
    else:
        method = {"bfgs": "BFGS", "l-bfgs-b": "L-BFGS-B"}[optimizer]
        opts = {"gtol": tol, "maxiter": max_iter}
        if method == "L-BFGS-B":
            # L-BFGS-B also stops when Q falls by less than ftol * max(|Q|, 1); Q is O(M/n), so
            # the default ftol would stop far from the optimum: leave the decision to gtol.
            opts["ftol"] = np.finfo(float).eps
        r = minimize(objective.value_and_gradient, x0, jac=True, method=method, options=opts,
                     callback=lambda intermediate_result: accepted(intermediate_result.x))
        x, status, success, message = r.x, int(r.status), bool(r.success), str(r.message)
        if not success and r.nit >= max_iter:
            message = f"stopped after --max-iter {max_iter} iterations without converging ({message})"
    Q, grad = objective.value_and_gradient(x)
    return OptimizeResult(x=np.asarray(x, dtype=np.float64), fun=Q, jac=grad, success=success, status=status,
                          message=message, nit=state["nit"], nfev=oracle.evaluations - evals0)
