"""GMM weight matrices (DESIGN.md, "GMM, step by step") and what a singular one means for the data.

The estimator works on scaled moments g~ = R g (R (M,), powers of two from the data's own units,
see estimate.py), so that moments in any units, up to |dm| ~ 1e154, never overflow their squares.
A weight matrix is held as the whitening that turns g~ into the optimizer's residual,

    r = A g~,   ||r||^2 = Q / q,   Q = g' W g,   q = tr(W S0) / n,

so the optimizer sees Q in units of its own sampling variance (O(1) whatever the data's units):
- "identity" (step 1, W = I in the data's units): A = diag(1 / (R sqrt(q))), q = tr(S0) / n with
  S0 the moment covariance at the start of the run;
- "standardized" (step 1 when M = P): W = diag(S0)^-1, each moment in units of its own standard
  deviation at the start. With as many moments as parameters the weight does not change the
  estimate (g = 0 at the solution), only the optimizer's path, which this makes independent of
  the moments' units: A = sqrt(n / M) diag(S~0)^-1/2, q = M / n;
- "inverse-covariance" (W = S^-1 with S = S(b1)): S~ = R S R = E C C' E with E = sqrt(diag S~)
  and C the Cholesky factor of the correlation matrix, A = sqrt(n / M) C^-1 E^-1, q = M / n.
W itself is never formed or inverted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.linalg import LinAlgError  # scipy.linalg's is numpy's

from estpipe.errors import UserError, term
from estpipe.estimation.linalg import GRAM_TOL, minimal_dependent_principal
from estpipe.text import count


@dataclass
class WeightMatrix:
    """The whitening of one GMM step (see the module docstring).

    kind: "identity", "standardized" or "inverse-covariance"; R: (M,) moment scale; log_q: log of the objective's
    normalization q; diag: (M,) A's diagonal (identity); S: (M, M) the scaled covariance
    R S R it inverts, with E (M,) and chol (M, M) lower (inverse-covariance)."""

    kind: str
    R: np.ndarray
    log_q: float
    diag: np.ndarray | None = None
    S: np.ndarray | None = None
    E: np.ndarray | None = None
    chol: np.ndarray | None = None

    @property
    def M(self) -> int:
        return len(self.R)

    @classmethod
    def identity(cls, R: np.ndarray, S_start: np.ndarray, n: int) -> "WeightMatrix":
        """W = I in the data's units, normalized by q = tr(S0) / n. S_start: R S0 R (M, M)."""
        R = np.asarray(R, dtype=np.float64)
        t = 1.0 / R  # the moments' own scales; t^2 may overflow, t / max(t) does not
        top = float(t.max())
        rel = t / top
        mass = float(np.sum(np.diag(S_start) * rel * rel)) / n
        if not (mass > 0 and math.isfinite(mass)):
            mass = 1.0  # every moment is constant: identification fails and says why
        diag = rel / math.sqrt(mass)
        return cls(kind="identity", R=R, log_q=2 * math.log(top) + math.log(mass), diag=diag)

    @classmethod
    def standardized(cls, R: np.ndarray, S_start: np.ndarray, n: int) -> "WeightMatrix":
        """W = diag(S0)^-1 (see the module docstring); S_start: R S0 R (M, M)."""
        R = np.asarray(R, dtype=np.float64)
        M = len(R)
        sd = np.sqrt(np.clip(np.diag(S_start), 0.0, None))
        sd = np.where(sd > 0, sd, 1.0)
        return cls(kind="standardized", R=R, log_q=math.log(M / n), diag=math.sqrt(n / M) / sd)

    @classmethod
    def inverse_of(cls, S: np.ndarray, R: np.ndarray, n: int, moment_names: list[str], n_units: int,
                   where: str, units: str = "sets") -> "WeightMatrix":
        """W = S^-1 for S~ = R S R (M, M); a singular S is a UserError naming the moments involved.
        units: what the n_units independent units of S are ("sets", "clusters" or "panel units")."""
        S = np.asarray(S, dtype=np.float64)
        R = np.asarray(R, dtype=np.float64)
        E, chol = _factor(S, moment_names, n_units, where, units)
        M = S.shape[0]
        return cls(kind="inverse-covariance", R=R, log_q=math.log(M / n), S=S, E=E, chol=chol)

    # -- the operator A ---------------------------------------------------------------------------
    def whiten(self, a: np.ndarray, normalized: bool = True) -> np.ndarray:
        """A a for scaled moments a (M,) or (M, P): the residual r = A g~, or its Jacobian.
        normalized=False drops the factor 1 / sqrt(q) (then ||A g~||^2 = g'Wg itself)."""
        a = np.asarray(a)
        if self.diag is not None:
            d = self.diag if normalized else self.diag * math.exp(self.log_q / 2)
            return a * (d if a.ndim == 1 else d[:, None])
        E = self.E if a.ndim == 1 else self.E[:, None]
        from scipy.linalg import solve_triangular

        out = solve_triangular(self.chol, a / E, lower=True)
        return out * math.exp(-self.log_q / 2) if normalized else out

    def whiten_transpose(self, r: np.ndarray) -> np.ndarray:
        """A' r (M,): pulls a residual-space vector back to the scaled moments."""
        if self.diag is not None:
            return r * self.diag
        from scipy.linalg import solve_triangular

        return solve_triangular(self.chol, r, lower=True, trans="T") / self.E * math.exp(-self.log_q / 2)

    def normalized_objective(self, g_scaled: np.ndarray) -> float:
        """||A g~||^2 = Q / q."""
        r = self.whiten(g_scaled)
        return float(r @ r)

    def objective(self, g_scaled: np.ndarray) -> float:
        """Q = g' W g in the data's units (inf if it overflows: moments near 1e154 with W = I)."""
        value = self.normalized_objective(g_scaled)
        if value == 0.0:
            return 0.0
        with np.errstate(over="ignore"):
            return float(np.exp(np.log(value) + self.log_q))

    def covariance_in_residual_space(self, S_scaled: np.ndarray) -> np.ndarray:
        """A S~ A' (M, M): the moment covariance as the residual sees it."""
        half = self.whiten(S_scaled)
        return self.whiten(half.T).T

    # -- checkpoints ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"kind": self.kind, "M": self.M, "R": self.R.tolist(), "log_q": self.log_q}
        if self.diag is not None:
            d["diag"] = self.diag.tolist()
        else:
            d["S"] = self.S.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WeightMatrix":
        """The inverse of to_dict (S was checked when the weight was first built)."""
        R = np.array(d["R"], dtype=np.float64)
        if d["kind"] in ("identity", "standardized"):
            return cls(kind=d["kind"], R=R, log_q=float(d["log_q"]), diag=np.array(d["diag"], dtype=np.float64))
        S = np.array(d["S"], dtype=np.float64)
        E = np.sqrt(np.diag(S))
        from scipy.linalg import cholesky

        chol = cholesky(S / np.outer(E, E), lower=True)
        return cls(kind="inverse-covariance", R=R, log_q=float(d["log_q"]), S=S, E=E, chol=chol)


def _factor(S: np.ndarray, moment_names: list[str], n_units: int, where: str,
            units: str = "sets") -> tuple[np.ndarray, np.ndarray]:
    """E = sqrt(diag S) and the Cholesky factor of the correlation matrix S / (E E'), checked."""
    check_covariance(S, moment_names, n_units, where, units)
    E = np.sqrt(np.diag(S))
    from scipy.linalg import cholesky

    try:
        chol = cholesky(S / np.outer(E, E), lower=True)
    except LinAlgError:
        raise UserError(f"the moment covariance S at {where} is not positive definite; "
                        f"{diagnose_covariance(S, moment_names, n_units, units)}") from None
    return E, chol


def check_covariance(S: np.ndarray, moment_names: list[str], n_units: int, where: str, units: str = "sets") -> None:
    """S (M, M), in any units: singular when the square root of the correlation matrix's smallest
    eigenvalue (a singular value of the moments' data matrix) is below GRAM_TOL of the largest."""
    if not np.all(np.isfinite(S)):
        raise UserError(f"the moment covariance S at {where} has non-finite entries; the moments overflow there: "
                        f"check the data for huge values or give another {term('start')}")
    d = np.sqrt(np.clip(np.diag(S), 0.0, None))
    flat = d <= GRAM_TOL * max(float(d.max(initial=0.0)), np.finfo(float).tiny)
    if flat.any():
        raise UserError(f"the moment covariance S at {where} is singular; {diagnose_covariance(S, moment_names, n_units, units)}")
    w = np.linalg.eigvalsh(S / np.outer(d, d))
    if not np.sqrt(max(w[0], 0.0)) > GRAM_TOL * np.sqrt(w[-1]):
        rank = int(np.sum(np.sqrt(np.clip(w, 0.0, None)) > GRAM_TOL * np.sqrt(w[-1])))
        raise UserError(f"the moment covariance S at {where} is singular (rank {rank} of {S.shape[0]}); "
                        f"{diagnose_covariance(S, moment_names, n_units, units)}")


# what the independent units of S are, in a message, and the option that also helps (besides more
# data or fewer moments), if any
_UNITS = {
    "sets": ("sets", None),
    "clusters": ("clusters", "no_cluster"),
    "panel units": ("decision makers: the file's panel units", None),
}


def diagnose_covariance(S: np.ndarray, moment_names: list[str], n_units: int, units: str = "sets") -> str:
    """Why S is singular, in terms of the data, and what to do. units: "sets", "clusters" or
    "panel units", what the n_units independent units of S are."""
    M = S.shape[0]
    d = np.sqrt(np.clip(np.diag(S), 0.0, None))
    flat = [moment_names[m] for m in range(M) if d[m] <= GRAM_TOL * max(float(d.max(initial=0.0)), np.finfo(float).tiny)]
    if flat:
        return (f"moment{'s' if len(flat) > 1 else ''} {', '.join(flat)} {'are' if len(flat) > 1 else 'is'} the same "
                "in every set (e.g. a dm column that is identically zero, or an instrument that never varies within "
                "sets); drop or rebuild those instruments")
    if n_units <= M:
        what, option = _UNITS.get(units, (units, None))
        fix = f"more data, fewer moments, or {term(option)}" if option else "more data or fewer moments"
        return (f"there {'is' if n_units == 1 else 'are'} only {count(n_units, 'independent unit')} ({what}) "
                f"for M = {M} moments; use {fix}")
    found = minimal_dependent_principal(S)
    involved = [moment_names[m] for m in (found or range(M))]
    return (f"moments {', '.join(involved)} are linearly dependent (one is a combination of the others); "
            "drop one of them")
