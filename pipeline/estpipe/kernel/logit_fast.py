"""The logit kernel fused by hand: the same sums as the generic dual path, with fewer passes.

The generic path builds the block [s | ds/db] with ds/db = s (X - xbar_i) and takes dm' [block].
Here the same product is rearranged so that no (rows, K) array is centred per set:

    dm' (s (X - xbar_i)) = dm' (s X) - sum_i h_i xbar_i',   h_i = sum_set s dm,  xbar_i = sum_set s x

The first term is one GEMM per tile, h_i and xbar_i are stacked (1, J) @ (J, .) products, and
the correction is a small (M, n_tile) @ (n_tile, K) product; the values are sum_i h_i. Tests
check it against the generic path. All buffers come from the kernel's workspace.
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Segments, Workspace


def logit_probabilities(X: np.ndarray, b: np.ndarray, seg: Segments, ws: Workspace, chosen=None):
    """Choice probabilities s (rows,) of u = X @ b within each set, stable for any |u|.

    chosen: (rows_idx, set_idx) of the chosen rows in the tile, or None. Returns (s, loglik), with
    loglik the sum of log s over the chosen rows (0.0 without chosen)."""
    n, t, J = seg.n_sets, seg.n_rows, seg.equal_size
    s = ws.take((t,))
    np.dot(X, b, out=s)
    m = seg.max1(s, ws.take((n,)))
    if J:
        S = s.reshape(n, J)
        np.subtract(S, m[:, None], out=S)
    else:
        rep = seg.broadcast(m, ws.take((t,)))
        np.subtract(s, rep, out=s)
    shifted = s[chosen[0]] if chosen is not None else None
    np.exp(s, out=s)
    total = seg.sum1(s, ws.take((n,)))
    if J:
        np.divide(S, total[:, None], out=S)
    else:
        np.divide(s, seg.broadcast(total, rep), out=s)
    loglik = 0.0
    if chosen is not None:
        loglik = float(np.sum(shifted) - np.sum(np.log(total[chosen[1]])))
    return s, loglik


def logit_tile_sums(X, dm, s, seg: Segments, ws: Workspace, acc: np.ndarray, jacobian: bool, need_h: bool):
    """Add this tile's [sum_i h_i | sum_i dh_i/db] to acc (M, 1 + K) (or (M, 1) without the
    Jacobian). Returns H (n_sets, M), the per-set h_i, when jacobian or need_h, else None."""
    n, t, K, M = seg.n_sets, seg.n_rows, X.shape[1], dm.shape[1]
    if not (jacobian or need_h):
        acc[:, 0] += np.dot(s, dm, out=ws.take((M,)))
        return None
    H = seg.weighted_sum(s, dm, ws.take((n, M)), None if seg.equal_size else ws.take((t, M)))
    acc[:, 0] += H.sum(axis=0)
    if jacobian:
        sX = ws.take((t, K))
        np.multiply(X, s[:, None], out=sX)
        acc[:, 1:] += np.dot(dm.T, sX, out=ws.take((M, K)))
        xbar = seg.sum(sX, ws.take((n, K)))
        acc[:, 1:] -= np.dot(H.T, xbar, out=ws.take((M, K)))
    return H


def logit_tile_pullback(X, dm, s, v, seg: Segments, ws: Workspace, acc: np.ndarray) -> None:
    """Add this tile's sum_i (dh_i/db)' v = X' (s (w - wbar_i)), w = dm v, to acc (K,)."""
    n, t = seg.n_sets, seg.n_rows
    w = np.dot(dm, v, out=ws.take((t,)))
    r = np.multiply(s, w, out=w)
    wbar = seg.sum1(r, ws.take((n,)))
    rep = seg.broadcast(wbar, ws.take((t,)))
    np.multiply(rep, s, out=rep)
    np.subtract(r, rep, out=r)
    acc += np.dot(r, X, out=ws.take((X.shape[1],)))
