"""The nested logit kernel: the probabilities and the moments' Jacobian in closed form, per tile.

With W_j = V_j / l_g (g the group of j: its nest within its set), S_g = sum_{i in g} exp(W_i),
L_g = log S_g, q_j = exp(W_j) / S_g, y_g = l_g L_g, Q_g = exp(y_g) / sum_{m in set} exp(y_m) and
P_j = q_j Q_g (models/nested_logit.py), the partials are

    dP_j/db      = P_j [ (x_j - xbar_g) / l_g + xbar_g - xbar_s ],  xbar_g = sum_g q x, xbar_s = sum_m Q_m xbar_m
    dP_j/dtheta_k = P_j ( [g = k] (Wbar_g - W_j + D_g) - Q_k D_k ),   Wbar_g = sum_g q W, D_g = l_g (L_g - Wbar_g)

(theta_k = log l_k; [g = k]: j's nest is k; Q_k D_k of the set's group of nest k, 0 when it has
none). Both are P_j / l_g (or P_j) times a per-group quantity taken to the rows plus a per-row
term, so the block [P | dP/db | dP/dtheta] (rows, 1 + P) costs a few passes over (rows, P):

    dP_j/db       = (P_j / l_g) (x_j + c_g),   c_g = (l_g - 1) xbar_g - l_g xbar_s
    dP_j/dtheta_k = P_j (a_gk - [g = k] W_j),  a_gk = [g = k] (Wbar_g + D_g) - Q_k D_k

and the value with the Jacobian is ONE GEMM dm' [P | dP] (the per-group factors taken to the rows
cost less than sums of w o dm over groups and products with them). The sums over groups (S, Wbar, xbar)
are products with the groups' sparse indicator (dual/groups.py); the ones over the ~3 groups of
each set are small. Utilities within a group are shifted by its maximum only when a bound on |W| says exp could
overflow (as in fused_logit.py). Tested equal to the model's reference (tests/test_nested_logit.py).
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Workspace
from estpipe.kernel.request import Request
from estpipe.kernel.tiles import TileData

# Below this |utility| exp cannot overflow and no group's sum can underflow (kernel/fused_logit.py).
SAFE_UTILITY = 600.0
# |log lambda| beyond this is the boundary (lambda below 1e-13 or above 1e13): evaluated there
LOG_LAMBDA_LIMIT = 30.0


class FusedNested:
    """The strategy for models.NestedLogit. Its pullback is the forward projection of v'h (the
    Jacobian's sums against w = dm v: one column instead of M)."""

    name = "fused-nested-logit"
    reverse = False

    def __init__(self, model):
        self.model = model

    def _levels(self, tile: TileData, params: np.ndarray, ws: Workspace):
        """Everything the value and the partials share: a dict of per-row, per-group and per-set
        arrays (workspace buffers: fresh large arrays would cost page faults on every evaluation)."""
        groups, _, _, param_row, param_group = self.model.layout(tile)
        X = tile.X
        rows, K = X.shape
        ng, n_sets = groups.n_groups, tile.seg.n_sets
        # log lambda clipped to +-LOG_LAMBDA_LIMIT: an optimizer step far out (exp overflowing) gives a
        # model at the boundary, not an overflow; the results then note the lambda at the boundary
        lam_ext = np.r_[np.exp(np.clip(params[K:].real, -LOG_LAMBDA_LIMIT, LOG_LAMBDA_LIMIT)) if not np.iscomplexobj(params) else np.exp(params[K:]), 1.0]  # index -1: no parameter, lambda 1
        lam_row = np.take(lam_ext, param_row, out=ws.take((rows,)))
        lam_g = np.take(lam_ext, param_group, out=ws.take((ng,)))
        V = np.dot(X, params[:K], out=ws.take((rows,)))
        W = np.divide(V, lam_row, out=ws.take((rows,)))
        e = ws.take((rows,))
        if max(W.max(initial=0.0), -W.min(initial=0.0)) < SAFE_UTILITY:  # max |W| without a temporary
            shift = None
            np.exp(W, out=e)
        else:
            shift = groups.max1(W, ws.take((ng,)))
            groups.broadcast(shift, e)
            np.subtract(W, e, out=e)
            np.exp(e, out=e)
        S = groups.sum(e, ws.take((ng,)))
        L = np.log(S, out=ws.take((ng,)))
        if shift is not None:
            L += shift
        y = np.multiply(lam_g, L, out=ws.take((ng,)))
        ey = ws.take((ng,))
        if np.abs(y).max(initial=0.0) < SAFE_UTILITY:
            upper_shift = None
            np.exp(y, out=ey)
        else:
            upper_shift = groups.sets.max1(y, ws.take((n_sets,)))
            np.subtract(y, upper_shift[groups.group_set], out=ey)
            np.exp(ey, out=ey)
        total = groups.set_sum(ey, ws.take((n_sets,)))
        Q = np.divide(ey, np.take(total, groups.group_set, out=ws.take((ng,))), out=ey)
        ratio = np.divide(Q, S, out=ws.take((ng,)))
        P = np.multiply(e, np.take(ratio, groups.row_group, out=ws.take((rows,))), out=ws.take((rows,)))  # q Q
        return dict(groups=groups, param_row=param_row, param_group=param_group, lam_row=lam_row, lam_g=lam_g,
                    V=V, W=W, e=e, S=S, L=L, y=y, Q=Q, P=P, total=total, upper_shift=upper_shift)

    def _sums(self, tile: TileData, dm: np.ndarray, params: np.ndarray, ws: Workspace, jacobian: bool,
              need_h: bool = False):
        """(dm' [P | dP/dtheta] (M, 1 + P), or dm' P (M, 1) without the Jacobian; per-set h (n_sets, M)
        when need_h with the Jacobian, else None; the levels)."""
        ws.reset()
        lv = self._levels(tile, params, ws)
        P = lv["P"]
        if not jacobian:
            return (P @ dm)[:, None], None, lv
        groups = lv["groups"]
        X = tile.X
        rows, K = X.shape
        M = dm.shape[1]
        Pn = len(params) - K
        ng, n_sets = groups.n_groups, tile.seg.n_sets
        lam_g, Q, S = lv["lam_g"], lv["Q"], lv["S"]
        e, W = lv["e"], lv["W"]
        # within-group means under q = e / S, and the set's mean of x under P
        Wbar = groups.sum(np.multiply(e, W, out=ws.take((rows,))), ws.take((ng,)))
        Wbar /= S
        D = np.subtract(lv["L"], Wbar, out=ws.take((ng,)))
        D *= lam_g
        xbar = groups.weighted_sum(e, X, ws.take((ng, K)))
        xbar /= S[:, None]
        xbar_s = groups.set_sum(np.multiply(xbar, Q[:, None], out=ws.take((ng, K))), ws.take((n_sets, K)))
        # c = (l - 1) xbar_g - l xbar_s (n_groups, K)
        c = np.take(xbar_s, groups.group_set, axis=0, out=ws.take((ng, K)))
        c *= -lam_g[:, None]
        c += np.multiply(xbar, (lam_g - 1.0)[:, None], out=ws.take((ng, K)))
        # with w = P / l: dP/db = w o (X + c[g]), dP/dtheta = P o a[g] - w o E (E = V o [j's nest is k],
        # P W = w V): the block [P | dP] (rows, 1 + P) from a few passes, then ONE GEMM dm' [P | dP]
        w = np.divide(P, lv["lam_row"], out=ws.take((rows,)))
        # column-major: each partial's column is written contiguously (measured ~20% faster than a
        # row-major block at 16,384 x 14); BLAS takes either
        B = ws.take((1 + K + Pn, rows)).T
        B[:, 0] = P
        xc = np.take(c, groups.row_group, axis=0, out=ws.take((rows, K)))
        xc += X
        np.multiply(xc, w[:, None], out=B[:, 1 : 1 + K])
        if Pn:
            _, N_rows, _, _, _ = self.model.layout(tile)
            pg = lv["param_group"]
            nested = np.flatnonzero(pg >= 0)
            QD = ws.take((ng, Pn))
            QD[...] = 0.0
            QD[nested, pg[nested]] = (Q * D)[nested]
            a = np.take(groups.set_sum(QD, ws.take((n_sets, Pn))), groups.group_set, axis=0, out=ws.take((ng, Pn)))
            a *= -1.0  # -Q_k D_k of the set
            a[nested, pg[nested]] += (Wbar + D)[nested]
            aT = np.ascontiguousarray(a.T)  # (Pn, n_groups)
            wV = np.multiply(w, lv["V"], out=ws.take((rows,)))
            scratch = ws.take((rows,))
            for k in range(Pn):
                col = B[:, 1 + K + k]
                np.take(aT[k], groups.row_group, out=col)
                col *= P
                col -= np.multiply(wV, N_rows[:, k], out=scratch)
        out = dm.T @ B  # (M, 1 + P)
        H = None
        if need_h:  # per-set h_i = sum_j P_j dm_j
            H = tile.seg.sum(np.multiply(dm, P[:, None], out=ws.take(dm.shape)), np.empty((n_sets, M)))
        return out, H, lv

    # -- the strategy protocol ------------------------------------------------------------------------
    def tile_sums(self, tile: TileData, dm, request: Request, ws: Workspace, acc, need_h: bool, chosen=None,
                  prescale: bool = False):
        params = np.asarray(request.params, dtype=np.float64)
        block, H, lv = self._sums(tile, dm, params, ws, request.jacobian, need_h)
        if request.jacobian and request.seed_scale is not None:
            block[:, 1:] /= request.seed_scale
        acc += block
        if need_h and H is None:  # per-set h_i = sum_j P_j dm_j
            seg = tile.seg
            H = seg.sum(np.multiply(dm, lv["P"][:, None], out=ws.take(dm.shape)), np.empty((seg.n_sets, dm.shape[1])))
        loglik = 0.0
        if chosen is not None:
            rows = chosen[0]
            g = lv["groups"].row_group[rows]
            s = lv["groups"].group_set[g]
            lse = np.log(lv["total"][s]) + (0.0 if lv["upper_shift"] is None else lv["upper_shift"][s])
            loglik = float(np.sum(lv["W"][rows] - lv["L"][g] + lv["y"][g] - lse))
        return H, loglik

    def tile_values(self, tile: TileData, dm, request: Request, ws: Workspace, acc, tape=None) -> None:
        block, _, _ = self._sums(tile, dm, np.asarray(request.params, dtype=np.float64), ws, False)
        acc += block

    def tile_pullback(self, tile: TileData, dm, request: Request, v, ws: Workspace, acc, tape=None,
                      prescale: bool = False) -> None:
        w = (dm @ v)[:, None]
        block, _, _ = self._sums(tile, w, np.asarray(request.params, dtype=np.float64), ws, True)
        if request.seed_scale is not None:
            block[:, 1:] /= request.seed_scale
        acc += block[0, 1:]
