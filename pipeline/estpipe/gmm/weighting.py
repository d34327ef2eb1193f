"""GMM weight matrices (DESIGN.md, "GMM, step by step") and what a singular one means for the data.

W = L L' is never formed to be inverted: the optimizer works on the residual L' g. For step 2,
W = S(b1)^-1 and S = C C' (Cholesky, C lower), so L' = C^-1 and L' a = solve(C, a).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cholesky, solve_triangular

from estpipe.errors import UserError

# Relative eigenvalue below which a symmetric matrix is treated as singular: beyond ~1e12 the
# inverse has lost most of its digits and the estimates and standard errors are noise.
SINGULAR_RCOND = 1e-12


@dataclass
class WeightMatrix:
    """W (M, M). kind "identity" (step 1) or "inverse-covariance" (W = S^-1, S given)."""

    kind: str
    M: int
    S: np.ndarray | None = None
    _C: np.ndarray | None = None

    @classmethod
    def identity(cls, M: int) -> "WeightMatrix":
        return cls(kind="identity", M=M)

    @classmethod
    def inverse_of(cls, S: np.ndarray, moment_names: list[str], n_units: int, where: str) -> "WeightMatrix":
        """W = S^-1; a singular S is a UserError naming the moments involved."""
        S = np.asarray(S, dtype=np.float64)
        check_covariance(S, moment_names, n_units, where)
        try:
            C = cholesky(S, lower=True)
        except LinAlgError:
            raise UserError(f"the moment covariance S at {where} is not positive definite; "
                            f"{diagnose_covariance(S, moment_names, n_units)}") from None
        return cls(kind="inverse-covariance", M=S.shape[0], S=S, _C=C)

    @property
    def matrix(self) -> np.ndarray:
        """W itself (M, M)."""
        if self.kind == "identity":
            return np.eye(self.M)
        Cinv = solve_triangular(self._C, np.eye(self.M), lower=True)
        return Cinv.T @ Cinv

    def whiten(self, a: np.ndarray) -> np.ndarray:
        """L' a for a (M,) or (M, P): the residual L' g, or the Jacobian L' G."""
        if self.kind == "identity":
            return a
        return solve_triangular(self._C, a, lower=True)

    def apply(self, a: np.ndarray) -> np.ndarray:
        """W a for a (M,) or (M, P)."""
        if self.kind == "identity":
            return a
        return solve_triangular(self._C, solve_triangular(self._C, a, lower=True), lower=True, trans="T")

    def objective(self, g: np.ndarray) -> float:
        """Q = g' W g."""
        r = self.whiten(g)
        return float(r @ r)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "M": self.M, "S": None if self.S is None else self.S.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "WeightMatrix":
        """The inverse of to_dict (S was checked when the weight was first built)."""
        if d["kind"] == "identity":
            return cls.identity(int(d["M"]))
        S = np.array(d["S"], dtype=np.float64)
        return cls(kind="inverse-covariance", M=S.shape[0], S=S, _C=cholesky(S, lower=True))


def _relative_eigenvalues(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    A = (A + A.T) / 2
    w, V = np.linalg.eigh(A)
    top = max(abs(w[-1]), np.finfo(float).tiny)
    return w / top, V


def check_covariance(S: np.ndarray, moment_names: list[str], n_units: int, where: str) -> None:
    if not np.all(np.isfinite(S)):
        raise UserError(f"the moment covariance S at {where} has non-finite entries; the moments overflow there: "
                        "check the data for huge values or give another --start")
    rel, _ = _relative_eigenvalues(S)
    if rel[0] < SINGULAR_RCOND:
        rank = int(np.sum(rel >= SINGULAR_RCOND))
        raise UserError(f"the moment covariance S at {where} is singular (rank {rank} of {S.shape[0]}); "
                        f"{diagnose_covariance(S, moment_names, n_units)}")


def diagnose_covariance(S: np.ndarray, moment_names: list[str], n_units: int) -> str:
    """Why S is singular, in terms of the data, and what to do."""
    M = S.shape[0]
    diag = np.diag(S)
    scale = max(float(diag.max()), np.finfo(float).tiny)
    flat = [moment_names[m] for m in range(M) if diag[m] <= SINGULAR_RCOND * scale]
    if flat:
        return (f"moment{'s' if len(flat) > 1 else ''} {', '.join(flat)} {'are' if len(flat) > 1 else 'is'} the same "
                "in every set (e.g. a dm column that is identically zero, or an instrument that never varies within "
                "sets); drop or rebuild those instruments")
    if n_units <= M:
        return (f"there are only {n_units} independent units (sets or clusters) for M = {M} moments; use more data, "
                "fewer moments, or --no-cluster")
    rel, V = _relative_eigenvalues(S)
    v = np.abs(V[:, 0])
    involved = [moment_names[m] for m in np.flatnonzero(v > 0.1 * v.max())]
    return (f"moments {', '.join(involved)} are linearly dependent (one is a combination of the others); "
            "drop one of them")


def check_identification(G: np.ndarray, W: WeightMatrix, param_names: list[str], where: str) -> np.ndarray:
    """Return (G'WG)^-1 (P, P); a singular G'WG is a UserError naming the parameters involved."""
    if not np.all(np.isfinite(G)):
        raise UserError(f"the moment Jacobian G at {where} has non-finite entries; check the data for huge values or give another --start")
    A = G.T @ W.apply(G)
    rel, _ = _relative_eigenvalues(A)
    if rel[0] < SINGULAR_RCOND:
        rank = int(np.sum(rel >= SINGULAR_RCOND))
        raise UserError(f"G'WG at {where} is singular (rank {rank} of {A.shape[0]}), so the parameters are not identified; "
                        f"{diagnose_jacobian(G, param_names)}")
    return np.linalg.inv(A)


def diagnose_jacobian(G: np.ndarray, param_names: list[str]) -> str:
    """Why G has deficient column rank, in terms of the data."""
    norms = np.linalg.norm(G, axis=0)
    top = max(float(norms.max()), np.finfo(float).tiny)
    flat = [param_names[k] for k in range(G.shape[1]) if norms[k] <= 1e-8 * top]
    if flat:
        return (f"{', '.join(flat)} never var{'y' if len(flat) > 1 else 'ies'} within sets (only differences within a set "
                "identify a logit; a constant per decision maker drops out): drop "
                f"{'them' if len(flat) > 1 else 'it'} or interact with alternative attributes")
    _, sv, Vt = np.linalg.svd(G / np.where(norms > 0, norms, 1.0), full_matrices=False)
    v = np.abs(Vt[-1])
    involved = [param_names[k] for k in np.flatnonzero(v > 0.1 * v.max())]
    return f"{', '.join(involved)} are collinear within sets (or the instruments cannot tell them apart); drop one of them"
