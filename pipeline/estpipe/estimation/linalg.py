"""Rank and conditioning decisions that do not depend on the data's units.

A matrix whose rows (moments) and columns (parameters) are in arbitrary units (dollars, minutes,
1e6 times either) is first equilibrated: scaled on both sides by positive diagonals until every
row and column has unit infinity-norm (Ruiz's iteration). Rank decisions then look at its
singular values relative to the largest, with a tolerance on singular values, never on the
eigenvalues of a product like G'WG, which would square the condition number. Scaling a column
by any factor changes nothing here but rounding.
"""

from __future__ import annotations

import numpy as np

# Relative singular value below which an equilibrated matrix is treated as rank deficient. Exact
# dependence in float64 data lands near 1e-15; a direction conditioned beyond 1e9 has fewer
# than 7 of the 16 significant digits left, so its estimate and standard error are noise.
RANK_TOL = 1e-9
# The same for a Gram matrix (a covariance S = H'H / n, or X'X within sets), judged by the square
# roots of its eigenvalues: it holds squares, so its own rounding (eps of the largest eigenvalue)
# hides singular values of H below sqrt(eps) ~ 1.5e-8 of the largest; 1e-7 leaves a margin.
GRAM_TOL = 1e-7
_RUIZ_ITERATIONS = 20


def pow2(values: np.ndarray) -> np.ndarray:
    """The power of two nearest above each |value| (1 for 0 or non-finite values): a scale
    whose products and quotients are exact in floating point."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    out = np.ones_like(v)
    ok = np.isfinite(v) & (v > 0)
    _, e = np.frexp(v[ok])
    out[ok] = np.ldexp(1.0, e)
    return out


def equilibrate(A: np.ndarray, rows: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Positive scales (r (m,), c (n,)) such that diag(r) A diag(c) has rows and columns of
    infinity-norm 1 (approximately; rows only when `rows`). Zero rows and columns keep scale 1.
    The scales are powers of two, so applying them is exact."""
    A = np.abs(np.asarray(A, dtype=np.float64))
    m, n = A.shape
    r, c = np.ones(m), np.ones(n)
    for _ in range(_RUIZ_ITERATIONS):
        B = A * r[:, None] * c[None, :]
        col = B.max(axis=0) if m else np.zeros(n)
        row = B.max(axis=1) if n and rows else np.ones(m)
        done = np.all(np.abs(np.log2(np.where(col > 0, col, 1.0))) < 1) and (
            not rows or np.all(np.abs(np.log2(np.where(row > 0, row, 1.0))) < 1))
        if rows:
            r = r / pow2(np.sqrt(np.where(row > 0, row, 1.0)))
        c = c / pow2(np.sqrt(np.where(col > 0, col, 1.0)))
        if done:
            break
    return r, c


def relative_singular_values(A: np.ndarray, equilibrated: bool = False) -> np.ndarray:
    """Singular values of A, divided by the largest (descending), after equilibrating A on both
    sides unless the caller has already scaled it (`equilibrated`: rows and columns in units
    taken from the data, which, unlike A's own entries, tell a column of rounding noise from a
    column of signal)."""
    A = np.asarray(A, dtype=np.float64)
    if A.size == 0:
        return np.zeros(min(A.shape))
    if not equilibrated:
        r, c = equilibrate(A)
        A = A * r[:, None] * c[None, :]
    sv = np.linalg.svd(A, compute_uv=False)
    top = sv[0] if sv.size and sv[0] > 0 else 1.0
    return sv / top


def numerical_rank(A: np.ndarray, tol: float = RANK_TOL, equilibrated: bool = False) -> int:
    return int(np.sum(relative_singular_values(A, equilibrated) > tol))


def _deficient(A: np.ndarray, cols: list[int], tol: float, zero_norm: float) -> bool:
    """Whether the columns `cols` of A (already equilibrated) are linearly dependent."""
    sub = A[:, cols]
    if len(cols) == 1:
        return bool(np.linalg.norm(sub) <= zero_norm)
    norms = np.linalg.norm(sub, axis=0)
    if np.any(norms <= zero_norm):
        return True
    sv = np.linalg.svd(sub / norms, compute_uv=False)
    return bool(sv[-1] <= tol * sv[0])


def minimal_dependent_columns(A: np.ndarray, tol: float = RANK_TOL,
                              equilibrated: bool = False) -> tuple[list[int], np.ndarray] | None:
    """A smallest-by-inclusion set of linearly dependent columns of A and their null vector.

    Columns are added in order until one depends on those before it; then every earlier column
    that is not needed for the dependence is dropped, which leaves a circuit: dependent, but
    independent after removing any one of its columns. Returns (column indices, v) with
    A[:, cols] @ v ~ 0 in the units of A (v normalized to max |v| = 1), or None when A has full
    column rank. A zero column is a circuit of one. `equilibrated` as in relative_singular_values."""
    A = np.asarray(A, dtype=np.float64)
    r, c = (np.ones(A.shape[0]), np.ones(A.shape[1])) if equilibrated else equilibrate(A)
    E = A * r[:, None] * c[None, :]
    zero_norm = tol * max(float(np.linalg.norm(E, axis=0).max(initial=0.0)), np.finfo(float).tiny)
    kept: list[int] = []
    for j in range(E.shape[1]):
        if not _deficient(E, kept + [j], tol, zero_norm):
            kept.append(j)
            continue
        circuit = kept + [j]
        for k in reversed(kept):
            trial = [i for i in circuit if i != k]
            if _deficient(E, trial, tol, zero_norm):
                circuit = trial
        sub = E[:, circuit]
        if len(circuit) == 1:
            v = np.ones(1)
        else:
            norms = np.linalg.norm(sub, axis=0)
            _, _, Vt = np.linalg.svd(sub / norms, full_matrices=False)
            v = Vt[-1] / norms  # back to the units of E's columns
        v = v * c[circuit]  # and to A's
        v = v / np.abs(v).max()
        return circuit, v
    return None


def minimal_dependent_principal(S: np.ndarray, tol: float = GRAM_TOL) -> list[int] | None:
    """For a symmetric positive semidefinite S: a smallest-by-inclusion set of indices whose
    principal submatrix is singular (those moments are linearly dependent), or None."""
    S = np.asarray(S, dtype=np.float64)
    d = np.sqrt(np.clip(np.diag(S), 0.0, None))
    flat = np.flatnonzero(d <= tol * max(float(d.max(initial=0.0)), np.finfo(float).tiny))
    if flat.size:
        return [int(flat[0])]
    C = S / np.outer(d, d)

    def singular(idx):
        w = np.linalg.eigvalsh(C[np.ix_(idx, idx)])
        return np.sqrt(max(w[0], 0.0)) <= tol * np.sqrt(max(w[-1], np.finfo(float).tiny))

    kept: list[int] = []
    for j in range(len(d)):
        if not singular(kept + [j]):
            kept.append(j)
            continue
        found = kept + [j]
        for k in reversed(kept):
            trial = [i for i in found if i != k]
            if singular(trial):
                found = trial
        return found
    return None


def pinv_columns(B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B'B)^-1 B' (n, m) and (B'B)^-1 (n, n) for B (m, n) of full column rank (the caller has
    checked it), from the SVD of B with its columns equilibrated, so a column in other units
    changes nothing but rounding."""
    B = np.asarray(B, dtype=np.float64)
    _, c = equilibrate(B, rows=False)
    U, sv, Vt = np.linalg.svd(B * c[None, :], full_matrices=False)
    left = (c[:, None] * Vt.T) / sv[None, :]  # C V Sigma^-1
    return left @ U.T, left @ left.T


def combinations_text(names: list[str], coefficients: np.ndarray, digits: int = 3) -> str:
    """'x3 = 1 x1 + 0.5 x2' from a null vector: the member with the largest |coefficient| on
    the left, the others with their coefficients on the right."""
    coefficients = np.asarray(coefficients, dtype=np.float64)
    a = int(np.argmax(np.abs(coefficients)))
    terms = []
    for name, v in zip(names, coefficients):
        if name == names[a]:
            continue
        w = -v / coefficients[a]
        sign = "-" if w < 0 else "+"
        terms.append((sign, f"{abs(w):.{digits}g} {name}"))
    if not terms:
        return f"{names[a]} = 0"
    first_sign, first = terms[0]
    text = ("-" if first_sign == "-" else "") + first
    for sign, term in terms[1:]:
        text += f" {sign} {term}"
    return f"{names[a]} = {text}"


__all__ = ["GRAM_TOL", "RANK_TOL", "combinations_text", "equilibrate", "minimal_dependent_columns", "minimal_dependent_principal",
           "numerical_rank", "pinv_columns", "pow2", "relative_singular_values"]
