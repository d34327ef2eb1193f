"""The nested logit kernel: the probabilities and the moments' Jacobian in closed form, per tile.

With W_j = V_j / l_g (g the group of j: its nest within its set), S_g = sum_{i in g} exp(W_i),
L_g = log S_g, q_j = exp(W_j) / S_g, y_g = l_g L_g, Q_g = exp(y_g) / sum_{m in set} exp(y_m) and
P_j = q_j Q_g (models/nested_logit.py), the partials are

    dP_j/db      = P_j [ (x_j - xbar_g) / l_g + xbar_g - xbar_s ],  xbar_g = sum_g q x, xbar_s = sum_m Q_m xbar_m
    dP_j/dtheta_k = P_j ( [g = k] (Wbar_g - W_j + D_g) - Q_k D_k ),   Wbar_g = sum_g q W, D_g = l_g (L_g - Wbar_g)

(theta_k = log l_k; [g = k]: j's nest is k; Q_k D_k the set's group of nest k, 0 when absent). So
the moments' Jacobian sum_j dm_j dP_j' needs no (rows, P) block of partials:

    G_b     = dmP' X + sum_g (1 - 1/l_g) dmbar_g xbar_g' - sum_s H_s xbar_s'
    G_theta = sum_g dmbar_g (Wbar_g + D_g)[g = k] - dmP' (V o [g = k]) - sum_s H_s Q_k D_k

with dmP_j = dm_j P_j / l_g, dmbar_g = l_g sum_{j in g} dmP_j and H_s = sum_{g in s} dmbar_g (the
set's h). One GEMM dmP' [X | V o nest] and products over groups and sets, which are ~3 per set.
Utilities within a group are shifted by its maximum only when a bound on |W| says exp could
overflow (as in fused_logit.py). Tested equal to the model's reference (tests/test_nested_logit.py).
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Workspace
from estpipe.kernel.request import Request
from estpipe.kernel.tiles import TileData

# Below this |utility| exp cannot overflow and no group's sum can underflow (kernel/fused_logit.py).
SAFE_UTILITY = 600.0


class FusedNested:
    """The strategy for models.NestedLogit. Its pullback is the forward projection of v'h (the
    Jacobian's sums against w = dm v: one column instead of M)."""

    name = "fused-nested-logit"
    reverse = False

    def __init__(self, model):
        self.model = model

    def _levels(self, tile: TileData, params: np.ndarray, ws: Workspace):
        """Everything the value and the partials share: a dict of per-row, per-group and per-set arrays."""
        groups, _, _, param_row, param_group = self.model.layout(tile)
        X = tile.X
        rows, K = X.shape
        lam_ext = np.r_[np.exp(params[K:]), 1.0]  # index -1: no parameter, lambda 1
        lam_row = lam_ext[param_row]
        lam_g = lam_ext[param_group]
        V = np.dot(X, params[:K], out=ws.take((rows,)))
        W = np.divide(V, lam_row, out=ws.take((rows,)))
        e = ws.take((rows,))
        if np.abs(W).max(initial=0.0) < SAFE_UTILITY:
            shift = None
            np.exp(W, out=e)
        else:
            shift = groups.max1(W, ws.take((groups.n_groups,)))
            groups.broadcast(shift, e)
            np.subtract(W, e, out=e)
            np.exp(e, out=e)
        S = groups.sum1(e, ws.take((groups.n_groups,)))
        L = np.log(S)
        if shift is not None:
            L += shift
        y = lam_g * L
        sets = groups.sets
        if np.abs(y).max(initial=0.0) < SAFE_UTILITY:
            upper_shift = None
            ey = np.exp(y)
        else:
            upper_shift = sets.max1(y, np.empty(tile.seg.n_sets))
            ey = np.exp(y - upper_shift[groups.group_set])
        total = sets.sum1(ey, np.empty(tile.seg.n_sets))
        Q = ey / total[groups.group_set]
        P = np.multiply(e, (Q / S)[groups.row_group], out=ws.take((rows,)))  # q Q
        return dict(groups=groups, param_row=param_row, param_group=param_group, lam_row=lam_row, lam_g=lam_g,
                    V=V, W=W, e=e, S=S, L=L, y=y, Q=Q, P=P, total=total, upper_shift=upper_shift)

    def _sums(self, tile: TileData, dm: np.ndarray, params: np.ndarray, ws: Workspace, jacobian: bool):
        """(value dm' P (M,), Jacobian (M, P) or None, H (n_sets, M) or None with the Jacobian, levels)."""
        ws.reset()
        lv = self._levels(tile, params, ws)
        P = lv["P"]
        value = P @ dm
        if not jacobian:
            return value, None, None, lv
        groups = lv["groups"]
        X = tile.X
        rows, K = X.shape
        M = dm.shape[1]
        Pn = len(params) - K
        lam_g, Q, S = lv["lam_g"], lv["Q"], lv["S"]
        e, W, V = lv["e"], lv["W"], lv["V"]
        # within-group means of W and x under q = e / S
        Wbar = groups.sum1(np.multiply(e, W, out=ws.take((rows,))), np.empty(groups.n_groups)) / S
        D = lam_g * (lv["L"] - Wbar)
        eX = np.multiply(X, e[:, None], out=ws.take((rows, K)))
        xbar = groups.sum(eX, np.empty((groups.n_groups, K)), None if groups.order is None else ws.take((rows, K)))
        xbar /= S[:, None]
        # the one GEMM: dmP' [X | V o nest]
        dmP = np.multiply(dm, (P / lv["lam_row"])[:, None], out=ws.take((rows, M)))
        XE = ws.take((rows, K + Pn))
        XE[:, :K] = X
        if Pn:
            XE[:, K:] = 0.0
            has = np.flatnonzero(lv["param_row"] >= 0)
            XE[has, K + lv["param_row"][has]] = V[has]
        T = dmP.T @ XE  # (M, K + Pn)
        dmbar = groups.sum(dmP, np.empty((groups.n_groups, M)), None if groups.order is None else ws.take((rows, M)))
        dmbar *= lam_g[:, None]
        sets = groups.sets
        H = sets.sum(dmbar, np.empty((tile.seg.n_sets, M)))
        xbar_s = sets.sum(xbar * Q[:, None], np.empty((tile.seg.n_sets, K)))
        G = np.empty((M, K + Pn))
        G[:, :K] = T[:, :K] + dmbar.T @ (xbar * (1.0 - 1.0 / lam_g)[:, None]) - H.T @ xbar_s
        if Pn:
            pg = lv["param_group"]
            nested = np.flatnonzero(pg >= 0)
            A = np.zeros((groups.n_groups, Pn))
            A[nested, pg[nested]] = (Wbar + D)[nested]
            B = np.zeros((groups.n_groups, Pn))
            B[nested, pg[nested]] = (Q * D)[nested]
            Bs = sets.sum(B, np.empty((tile.seg.n_sets, Pn)))
            G[:, K:] = dmbar.T @ A - T[:, K:] - H.T @ Bs
        return value, G, H, lv

    # -- the strategy protocol ------------------------------------------------------------------------
    def tile_sums(self, tile: TileData, dm, request: Request, ws: Workspace, acc, need_h: bool, chosen=None,
                  prescale: bool = False):
        params = np.asarray(request.params, dtype=np.float64)
        value, G, H, lv = self._sums(tile, dm, params, ws, request.jacobian)
        acc[:, 0] += value
        if G is not None:
            if request.seed_scale is not None:
                G /= request.seed_scale
            acc[:, 1:] += G
        if need_h and H is None:
            seg = tile.seg
            H = np.add.reduceat(lv["P"][:, None] * dm, seg.starts, axis=0)
        loglik = 0.0
        if chosen is not None:
            rows = chosen[0]
            g = lv["groups"].row_group[rows]
            s = lv["groups"].group_set[g]
            lse = np.log(lv["total"][s]) + (0.0 if lv["upper_shift"] is None else lv["upper_shift"][s])
            loglik = float(np.sum(lv["W"][rows] - lv["L"][g] + lv["y"][g] - lse))
        return (H if need_h else None), loglik

    def tile_values(self, tile: TileData, dm, request: Request, ws: Workspace, acc, tape=None) -> None:
        value, _, _, _ = self._sums(tile, dm, np.asarray(request.params, dtype=np.float64), ws, False)
        acc[:, 0] += value

    def tile_pullback(self, tile: TileData, dm, request: Request, v, ws: Workspace, acc, tape=None,
                      prescale: bool = False) -> None:
        w = (dm @ v)[:, None]
        _, G, _, _ = self._sums(tile, w, np.asarray(request.params, dtype=np.float64), ws, True)
        if request.seed_scale is not None:
            G /= request.seed_scale
        acc += G[0]
