"""The Python API: the logit moments of arrays in memory (DESIGN.md, "Python API").

`LogitMoments` is the reusable form, ForwardDiff's GradientConfig idea applied to the whole
kernel: the data are checked and the tiles planned once, and the tile buffers and thread pool made
on the first evaluation are kept, so an optimizer's repeated calls allocate only their small
results. `logit_moments` is the one-shot function over it.
"""

from __future__ import annotations

import numpy as np

from estpipe.data.format import ChoiceData
from estpipe.errors import UserError
from estpipe.kernel.engine import PartitionKernel

# Rows per block when looking for NaN or infinite values: a bounded temporary, whatever the data.
_CHECK_ROWS = 65536


class LogitMoments:
    """Mean moments g(b) (M,) and their Jacobian G(b) = dg/db (M, K) of the logit model on fixed
    data, for repeated evaluation (DESIGN.md: u = X b, s = softmax within each set,
    g = (1/n) sum_i sum_j s_ij dm_ij).

    X: (n_rows, K) covariates; dm: (n_rows, M) moment vectors; offsets: (n_sets + 1,) integers,
    set i owning rows offsets[i]:offsets[i+1] (offsets[0] = 0, strictly increasing,
    offsets[-1] = n_rows). They are checked here and kept by reference: float64 C-contiguous
    arrays are not copied, so changing them in place later changes the results.
    check_finite: look for NaN and infinite values in X and dm here (one pass over the data, as
    scipy.linalg's check_finite). Either way a call whose results come out NaN or infinite names
    the input value responsible: a NaN in X or dm always shows in g, an infinite value in G (in g
    too, unless it is an x that only drives its row's probability to 0).
    threads: threads over tiles (default: the BLAS thread count); tile_rows: rows per tile.

    Calls share the buffers, so make one object per thread that evaluates. The thread pool lives
    until close(); use the object as a context manager:

        with LogitMoments(X, dm, offsets) as moments:
            g, G = moments(b)
    """

    def __init__(self, X, dm, offsets, *, check_finite: bool = True, threads: int | None = None,
                 tile_rows: int | None = None):
        X = _real_matrix("X", X, "(n_rows, K)")
        dm = _real_matrix("dm", dm, "(n_rows, M)")
        if dm.shape[0] != X.shape[0]:
            raise UserError(f"X has {X.shape[0]} rows but dm has {dm.shape[0]}; both need one row per "
                            "alternative (n_rows)")
        offsets = _offsets(offsets, X.shape[0])
        if check_finite:
            _check_finite(X, dm, offsets)
        self._kernel = PartitionKernel(ChoiceData(X=X, dm=dm, offsets=offsets), model="logit",
                                       tile_rows=tile_rows, threads=threads)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def n_sets(self) -> int:
        return self._kernel.data.n_sets

    @property
    def n_rows(self) -> int:
        return self._kernel.data.n_rows

    @property
    def K(self) -> int:
        return self._kernel.data.K

    @property
    def M(self) -> int:
        return self._kernel.data.M

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the reusable tile buffers (memory beyond the data; 0 before the first call)."""
        return self._kernel.buffer_nbytes

    # -- evaluations ----------------------------------------------------------------------------
    def __call__(self, params, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(g, G) at params (K,): g (M,), G (M, K), or None when jacobian=False."""
        sums = self._sums(params, jacobian=jacobian)
        return sums.g, sums.G

    def objective(self, params, W=None) -> float:
        """Q(b) = g' W g; W: (M, M), the identity when None."""
        g, _ = self(params, jacobian=False)
        return float(g @ self._apply(W, g))

    def objective_and_gradient(self, params, W=None) -> tuple[float, np.ndarray]:
        """(Q, dQ/db (K,)) with Q = g' W g: what scipy.optimize.minimize(..., jac=True) calls.
        W: (M, M), the identity when None (dQ/db = G' (W + W') g, i.e. 2 G' W g for a symmetric W)."""
        g, G = self(params)
        Wg = self._apply(W, g)
        grad = G.T @ (2.0 * Wg if W is None else Wg + self._apply(W, g, transpose=True))
        return float(g @ Wg), grad

    def moment_covariance(self, params) -> np.ndarray:
        """S(b) (M, M) = (1/n) sum_i (h_i - g)(h_i - g)', the centered covariance of the sets'
        moments h_i; np.linalg.inv(S(b1)) is the efficient two-step weight matrix."""
        return self._sums(params, jacobian=False, covariance=True).S

    def close(self) -> None:
        """Stop the thread pool (a later call starts it again)."""
        self._kernel.close()

    def __enter__(self) -> "LogitMoments":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sums(self, params, **options):
        """The kernel's MomentSums at params; a NaN or infinite result (or a floating-point error
        raised on the way) is traced back to the input value responsible."""
        b = self._params(params)
        d = self._kernel.data
        try:
            sums = self._kernel.sums(b, **options)
        except FloatingPointError:
            _check_finite(d.X, d.dm, d.offsets)
            raise
        if not np.isfinite(sums.gG).all():
            _check_finite(d.X, d.dm, d.offsets)
        return sums

    # -- argument checks ------------------------------------------------------------------------
    def _params(self, params) -> np.ndarray:
        b = np.asarray(params)
        if b.shape != (self.K,):
            raise UserError(f"params must have shape (K,) = ({self.K},), one per column of X; got shape {b.shape}")
        if not (np.issubdtype(b.dtype, np.floating) or np.issubdtype(b.dtype, np.integer)):
            raise UserError(f"params must be real numbers, got dtype {b.dtype}")
        b = b.astype(np.float64, copy=False)
        if not np.isfinite(b).all():
            k = int(np.flatnonzero(~np.isfinite(b))[0])
            raise UserError(f"params[{k}] is {b[k]}; the moments need finite parameters")
        return b

    def _apply(self, W, g: np.ndarray, transpose: bool = False) -> np.ndarray:
        if W is None:
            return g
        W = np.asarray(W)
        if W.shape != (self.M, self.M):
            raise UserError(f"W must have shape (M, M) = ({self.M}, {self.M}), one row and column per "
                            f"column of dm; got shape {W.shape}")
        return (W.T if transpose else W) @ g


def logit_moments(params, X, dm, offsets, jacobian=True):
    """Mean moments g (M,) and their Jacobian G (M, K) (None when jacobian=False) of the logit model.

    params: (K,); X: (n_rows, K); dm: (n_rows, M); offsets: (n_sets + 1,). Checks the data and
    makes the kernel's buffers and threads on every call: for repeated calls on the same data
    (an optimizer), build a LogitMoments once instead."""
    # No pass over the data for NaN: a NaN or infinite input that matters shows in the result
    # (LogitMoments._sums), and the one pass would cost half an evaluation at 20,000 x 30.
    with LogitMoments(X, dm, offsets, check_finite=False) as moments:
        return moments(params, jacobian=jacobian)


def _real_matrix(name: str, a, shape: str) -> np.ndarray:
    """a as a C-contiguous float64 (rows, columns) array (no copy when it is one already)."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise UserError(f"{name} must be a 2-D array {shape}, got {a.ndim} dimension(s), shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)) or a.dtype == np.float16:
        raise UserError(f"{name} must hold real numbers (float64), got dtype {a.dtype}")
    if a.shape[1] == 0:
        raise UserError(f"{name} has no columns; it needs at least one {shape}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _offsets(offsets, n_rows: int) -> np.ndarray:
    o = np.asarray(offsets)
    if o.ndim != 1 or len(o) < 2:
        raise UserError(f"offsets must be a 1-D array (n_sets + 1,) with at least 2 entries, got shape {o.shape}")
    if not np.issubdtype(o.dtype, np.integer):
        raise UserError(f"offsets must be integers (row positions), got dtype {o.dtype}; "
                        "convert with offsets.astype(np.int64) if the values are whole numbers")
    o = o.astype(np.int64, copy=False)
    if o[0] != 0:
        raise UserError(f"offsets must start at 0 (set 0 starts at row 0), got offsets[0] = {o[0]}")
    steps = np.diff(o)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise UserError(f"offsets must be strictly increasing (every set needs a row): offsets[{i + 1}] = "
                        f"{o[i + 1]} is not above offsets[{i}] = {o[i]} (set {i})")
    if o[-1] != n_rows:
        raise UserError(f"offsets must end at n_rows = {n_rows} (the rows of X and dm), got offsets[-1] = {o[-1]}")
    return o


def _check_finite(X: np.ndarray, dm: np.ndarray, offsets: np.ndarray) -> None:
    """A UserError naming the first NaN or infinite value of X (n_rows, K), then of dm (n_rows, M):
    argument, row, column and set."""
    for name, a in (("X", X), ("dm", dm)):
        for r0 in range(0, a.shape[0], _CHECK_ROWS):
            block = a[r0 : r0 + _CHECK_ROWS]
            if np.isfinite(block).all():
                continue
            row, col = (int(v) for v in np.argwhere(~np.isfinite(block))[0])
            row += r0
            i = int(np.searchsorted(offsets, row, side="right")) - 1
            raise UserError(f"{name}[{row}, {col}] is {a[row, col]} (set {i}); the moments need finite values: "
                            "drop or fill that row before building the moments")
