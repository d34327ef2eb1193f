"""Inference at the final estimate (DESIGN.md, "GMM, step by step"): covariance, standard errors
and the J test of over-identifying restrictions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

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
    return JTest(statistic=float(J), df=int(df), pvalue=float(stats.chi2.sf(J, df)))


def z_table(params: np.ndarray, std_errors: np.ndarray, level: float = 0.95) -> dict[str, np.ndarray]:
    """z statistics, two-sided p-values and the `level` normal interval, all (P,)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = params / std_errors
    p = 2 * stats.norm.sf(np.abs(z))
    q = stats.norm.ppf(0.5 + level / 2)
    return {"z": z, "p": p, "lower": params - q * std_errors, "upper": params + q * std_errors}
