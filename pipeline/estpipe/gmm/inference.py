"""Inference at the final estimate (DESIGN.md, "GMM, step by step"): covariance, standard errors
and the J test of over-identifying restrictions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from estpipe.gmm.weighting import WeightMatrix, check_identification


def sandwich_covariance(G: np.ndarray, W: WeightMatrix, S: np.ndarray, n: int, param_names: list[str],
                        where: str) -> np.ndarray:
    """One-step V = (G'WG)^-1 G'W S W G (G'WG)^-1 / n. G: (M, P); S: (M, M). Returns (P, P)."""
    bread = check_identification(G, W, param_names, where)
    WG = W.apply(G)
    meat = WG.T @ S @ WG
    V = bread @ meat @ bread / n
    return (V + V.T) / 2


def efficient_covariance(G: np.ndarray, S_weight: WeightMatrix, n: int, param_names: list[str], where: str) -> np.ndarray:
    """Efficient V = (G' S^-1 G)^-1 / n, with S^-1 given as a WeightMatrix. Returns (P, P)."""
    V = check_identification(G, S_weight, param_names, where) / n
    return (V + V.T) / 2


@dataclass
class JTest:
    """Hansen's J = n g' S^-1 g, chi-squared with M - P degrees of freedom under correct specification."""

    statistic: float
    df: int
    pvalue: float
    null: str = "the moment conditions hold (the model is correctly specified)"


def j_test(g: np.ndarray, S_weight: WeightMatrix, n: int, P: int) -> JTest | None:
    """The J test, or None when it is not defined (just-identified: M = P)."""
    df = g.shape[0] - P
    if df <= 0:
        return None
    J = n * S_weight.objective(g)
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
