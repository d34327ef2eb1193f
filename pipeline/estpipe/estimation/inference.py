"""Inference at the final estimate (DESIGN.md, "GMM, step by step"): covariance, standard errors
and the J test of over-identifying restrictions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from estpipe.errors import UserError, term
from estpipe.estimation.linalg import (RANK_TOL, combinations_text, minimal_dependent_columns, pinv_columns,
                               relative_singular_values)
from estpipe.estimation.weighting import WeightMatrix


def check_identification(B: np.ndarray, param_names: list[str], where: str, explain=None) -> None:
    """B (M, P): the moment Jacobian whitened by S^-1 (rows) with columns in units from the data
    (see estimate.py). The parameters are identified when no singular value of B is below
    RANK_TOL of its largest; otherwise a UserError names the smallest set of parameters that move
    together and, through explain(columns, coefficients) -> str, the data fact behind it."""
    if not np.all(np.isfinite(B)):
        raise UserError(f"the moment Jacobian G at {where} has non-finite entries; check the data for huge values "
                        f"or give another {term('start')}")
    rel = relative_singular_values(B, equilibrated=True)
    if rel.size and rel[-1] > RANK_TOL:
        return
    rank = int(np.sum(rel > RANK_TOL))
    found = minimal_dependent_columns(B, equilibrated=True)
    cols, v = found if found is not None else (list(range(B.shape[1])), np.ones(B.shape[1]))
    reason = explain(cols, v) if explain is not None else default_explanation([param_names[k] for k in cols], v)
    raise UserError(f"the parameters are not identified at {where} (the moment Jacobian has rank {rank} of "
                    f"{B.shape[1]}): {reason}")


def default_explanation(names: list[str], coefficients: np.ndarray) -> str:
    if len(names) == 1:
        return (f"no moment responds to {names[0]} (its column of the moment Jacobian is zero); fix it, drop it, "
                "or add moments that depend on it")
    return (f"the moments cannot tell {', '.join(names)} apart: moving the parameters along "
            f"{combinations_text(names, coefficients)} leaves every moment unchanged; drop one of them or add moments")


def covariance_of_estimates(B: np.ndarray, n: int, S_residual: np.ndarray | None = None) -> np.ndarray:
    """Covariance (P, P) of the estimates in the parameters B's columns are in.

    B (M, P): the step's whitened moment Jacobian. With S_residual = A S A' (the moment
    covariance seen through the same whitening), the one-step sandwich
    (B'B)^-1 B' S_res B (B'B)^-1 / n; without, the efficient (B'B)^-1 / n (B whitened by S^-1
    itself, not normalized). Computed from the SVD of B with equilibrated columns."""
    pinv, inv = pinv_columns(B)
    if S_residual is None:
        V = inv / n
    else:
        V = pinv @ S_residual @ pinv.T / n
    return (V + V.T) / 2


@dataclass
class JTest:
    """Hansen's J = n g' S^-1 g, chi-squared with M - P degrees of freedom under correct specification."""

    statistic: float
    df: int
    pvalue: float
    null: str = "the moment conditions hold (the model is correctly specified)"


def j_test(g_scaled: np.ndarray, S_weight: WeightMatrix, n: int, P: int) -> JTest | None:
    """The J test n g' S^-1 g from the scaled moments g~ = R g and W = S^-1, or None when it is
    not defined (just-identified: M = P)."""
    df = g_scaled.shape[0] - P
    if df <= 0:
        return None
    r = S_weight.whiten(g_scaled, normalized=False)
    J = n * float(r @ r)
    return JTest(statistic=float(J), df=int(df), pvalue=chi2_sf(float(J), int(df)))


def z_table(params: np.ndarray, std_errors: np.ndarray, level: float = 0.95) -> dict[str, np.ndarray]:
    """z statistics, two-sided p-values and the `level` normal interval, all (P,)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = params / std_errors
    p = np.array([math.erfc(abs(v) / math.sqrt(2.0)) if np.isfinite(v) else 0.0 for v in np.ravel(z)]).reshape(z.shape)
    p[np.isnan(z)] = np.nan
    q = NormalDist().inv_cdf(0.5 + level / 2)
    return {"z": z, "p": p, "lower": params - q * std_errors, "upper": params + q * std_errors}


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x) for an integer df >= 1, in closed form (the stdlib only: scipy.stats and
    scipy.special cost 0.4-0.8 s of every run's start-up, more than the J test is worth).

    Even df: exp(-x/2) sum_{k < df/2} (x/2)^k / k!. Odd df: erfc(sqrt(x/2)) + exp(-x/2)
    sum_{k=1}^{(df-1)/2} (x/2)^(k-1/2) / Gamma(k+1/2). The terms are summed from their logs, so
    neither exp(-x/2) underflowing nor (x/2)^k overflowing loses the sum."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if not x > 0:
        return 1.0 if x == x else math.nan
    if math.isinf(x):
        return 0.0
    h = x / 2
    if df % 2 == 0:
        logs = [-h + k * math.log(h) - math.lgamma(k + 1) for k in range(df // 2)]
        head = 0.0
    else:
        logs = [-h + (k - 0.5) * math.log(h) - math.lgamma(k + 0.5) for k in range(1, (df - 1) // 2 + 1)]
        head = math.erfc(math.sqrt(h))
    if not logs:
        return head
    top = max(logs)
    return min(1.0, head + math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


@dataclass
class Derived:
    """A quantity derived from the parameters, with its delta-method standard error and a z test
    against `null`."""

    name: str
    estimate: float
    std_error: float
    null: float = 0.0

    @property
    def z(self) -> float:
        return (self.estimate - self.null) / self.std_error if self.std_error > 0 else math.nan

    @property
    def p_value(self) -> float:
        z = self.z
        return math.erfc(abs(z) / math.sqrt(2.0)) if math.isfinite(z) else math.nan

    def to_dict(self) -> dict:
        return {"name": self.name, "estimate": self.estimate, "std_error": self.std_error, "null": self.null,
                "z": self.z, "p_value": self.p_value}


def delta_method(function, params: np.ndarray, covariance: np.ndarray, nulls: dict | None = None) -> list[Derived]:
    """Derived quantities function(params) -> {name: value} with standard errors from
    J V J', J by central differences (steps 1e-6 max(1, |p|): the functions are smooth, few
    parameters)."""
    params = np.asarray(params, dtype=np.float64)
    base = function(params)
    if not base:
        return []
    names = list(base)
    J = np.zeros((len(names), len(params)))
    for k in range(len(params)):
        h = 1e-6 * max(1.0, abs(params[k]))
        up, down = params.copy(), params.copy()
        up[k] += h
        down[k] -= h
        fu, fd = function(up), function(down)
        J[:, k] = [(fu[n] - fd[n]) / (2 * h) for n in names]
    V = J @ covariance @ J.T
    nulls = nulls or {}
    return [Derived(name, float(base[name]), float(np.sqrt(max(V[i, i], 0.0))), float(nulls.get(name, 0.0)))
            for i, name in enumerate(names)]
