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
from estpipe.kernel.request import Request
from estpipe.kernel.tiles import TileData


SAFE_UTILITY = 600.0


def logit_probabilities(X: np.ndarray, b: np.ndarray, seg: Segments, ws: Workspace, chosen=None, out=None):
    """Choice probabilities s (rows,) of u = X @ b within each set, stable for any |u|; into
    `out` (rows,) when given, else into a workspace buffer.

    chosen: (rows_idx, set_idx) of the chosen rows in the tile, or None. Returns (s, loglik), with
    loglik the sum of log s over the chosen rows (0.0 without chosen)."""
    n, t, J = seg.n_sets, seg.n_rows, seg.equal_size
    s = ws.take((t,)) if out is None else out
    np.dot(X, b, out=s)
    S = s.reshape(n, J) if J else None
    rep = None if J else ws.take((t,))
    # Shifting each set by its maximum keeps exp in range for any utility, but costs two passes.
    # When every |u| < SAFE_UTILITY, exp(u) cannot overflow and no set's sum can fall below
    # exp(-SAFE_UTILITY), far above the smallest normal number, so the shift can be skipped.
    m = ws.take((n,))
    if not (-SAFE_UTILITY < s.min() and s.max() < SAFE_UTILITY):
        seg.max1(s, m)
        if J:
            np.subtract(S, m[:, None], out=S)
        else:
            np.subtract(s, seg.broadcast(m, rep), out=s)
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


def logit_tile_sums(X, dm, s, seg: Segments, ws: Workspace, acc: np.ndarray, jacobian: bool, need_h: bool,
                    dm_single: np.ndarray | None = None, inv_scale: np.ndarray | None = None,
                    prescale: bool = False):
    """Add this tile's [sum_i h_i | sum_i dh_i/dbeta] to acc (M, 1 + K) (or (M, 1) without the
    Jacobian), beta = b / inv_scale. Returns H (n_sets, M), the per-set h_i, when jacobian or
    need_h, else None.

    dm_single: the tile's dm in float32; when given, the Jacobian's GEMM runs in float32 (about
    1.5x the speed) for search directions. The values (column 0) stay float64 either way.
    inv_scale: (K,) 1 / the seed scale, or None. The tile's Jacobian is scaled once it is
    formed (an (M, K) product), unless `prescale`: then s X is scaled before the GEMM, one more
    pass over the tile, for data whose |x| |dm| would overflow the unscaled tile product."""
    n, t, K, M = seg.n_sets, seg.n_rows, X.shape[1], dm.shape[1]
    if not (jacobian or need_h):
        acc[:, 0] += np.dot(s, dm, out=ws.take((M,)))
        return None
    H = seg.weighted_sum(s, dm, ws.take((n, M)), None if seg.equal_size else ws.take((t, M)))
    acc[:, 0] += H.sum(axis=0)
    if jacobian:
        dtype = np.float64 if dm_single is None else np.float32
        sX = ws.take((t, K), dtype)
        np.multiply(X, s[:, None], out=sX, casting="same_kind")
        if prescale and inv_scale is not None:
            sX *= inv_scale.astype(dtype, copy=False)
        # (sX' dm)' rather than dm' sX: the same GEMM, ~10% faster in OpenBLAS with both operands
        # transposed-contiguous (measured on one core at 16,380 rows: 0.92 against 1.02 ms).
        Jt = np.dot(sX.T, dm if dm_single is None else dm_single, out=ws.take((K, M), dtype)).T
        xbar = seg.sum(sX, ws.take((n, K), dtype))
        correction = np.dot(H.T, xbar.astype(np.float64, copy=False), out=ws.take((M, K)))
        if inv_scale is None or prescale:
            acc[:, 1:] += Jt
            acc[:, 1:] -= correction
        else:
            J = np.subtract(Jt, correction, out=correction)
            J *= inv_scale
            acc[:, 1:] += J
    return H


def logit_tile_pullback(X, dm, s, v, seg: Segments, ws: Workspace, acc: np.ndarray,
                        inv_scale: np.ndarray | None = None, prescale: bool = False) -> None:
    """Add this tile's sum_i (dh_i/dbeta)' v = X' (s (w - wbar_i)) / scale, w = dm v, to acc (K,)."""
    n, t, J = seg.n_sets, seg.n_rows, seg.equal_size
    w = np.dot(dm, v, out=ws.take((t,)))
    if J:  # r = s (w - wbar_i) in three passes over the reshaped (n_sets, J) rows
        S, Wr = s.reshape(n, J), w.reshape(n, J)
        wbar = np.einsum("ij,ij->i", S, Wr, out=ws.take((n,)))
        np.subtract(Wr, wbar[:, None], out=Wr)
        r = np.multiply(w, s, out=w)
    else:
        r = np.multiply(s, w, out=w)
        wbar = seg.sum1(r, ws.take((n,)))
        rep = seg.broadcast(wbar, ws.take((t,)))
        np.multiply(rep, s, out=rep)
        np.subtract(r, rep, out=r)
    if inv_scale is None:
        acc += np.dot(r, X, out=ws.take((X.shape[1],)))
    elif prescale:
        acc += np.dot(r, np.multiply(X, inv_scale, out=ws.take(X.shape)), out=ws.take((X.shape[1],)))
    else:
        acc += np.dot(r, X, out=ws.take((X.shape[1],))) * inv_scale


class FusedLogit:
    """The strategy for the textbook logit (models.Logit): the sums above, and the reverse rule.

    Its tape is the probabilities s of a value pass (8 bytes per row), which the reverse rule
    needs. single: the float32 copy of dm for precision="single" Jacobians (made by the engine)."""

    name = "fused-logit"
    reverse = True

    def tile_sums(self, tile: TileData, dm, request: Request, ws: Workspace, acc, need_h: bool, chosen=None,
                  prescale: bool = False, dm_single=None):
        X, seg = tile.X, tile.seg
        ws.reset()
        s, loglik = logit_probabilities(X, request.params, seg, ws, chosen)
        H = logit_tile_sums(X, dm, s, seg, ws, acc, request.jacobian, need_h=need_h, dm_single=dm_single,
                            inv_scale=request.inv_seed_scale, prescale=prescale)
        return H, loglik

    def tile_values(self, tile: TileData, dm, request: Request, ws: Workspace, acc, tape=None) -> None:
        X, seg = tile.X, tile.seg
        ws.reset()
        s, _ = logit_probabilities(X, request.params, seg, ws, out=tape)
        logit_tile_sums(X, dm, s, seg, ws, acc, False, need_h=False)

    def tile_pullback(self, tile: TileData, dm, request: Request, v, ws: Workspace, acc, tape=None,
                      prescale: bool = False) -> None:
        X, seg = tile.X, tile.seg
        ws.reset()
        s = tape if tape is not None else logit_probabilities(X, request.params, seg, ws)[0]
        logit_tile_pullback(X, dm, s, v, seg, ws, acc, request.inv_seed_scale, prescale)
