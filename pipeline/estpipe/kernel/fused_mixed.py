"""The mixed logit kernel: the simulated probabilities and their partials with the draws summed
by matrix products, not a dual pass over every (row, draw).

For one set (J rows) and the probabilities S (J, R) of its rows under its unit's R draws,
D_r = diag(s_r) - s_r s_r', and a parameter p that moves the utilities of draw r by
du_r/dtheta_p = x_k(p) w_rp (w = 1 for a fixed coefficient or a normal mean; eta_l for a spread
entry L_kl; beta_k, beta_k eta_l for a lognormal's b and spread):

    sbar = (1/R) sum_r s_r
    dsbar/dtheta_p = (1/R) sum_r D_r x_k w_rp
                   = [diag(sbar) - S S' / R] x_k                 (w = 1: one J x J matrix per set)
                   = ((S w_p) o x_k - S (w_p o c_k)) / R        (c_rk = s_r' x_k, per draw)

so per set the draws enter through S S' (J x J), S w (J x Pw) and S (w o c) (J x Pw), all
batched matrix products over the draws, and the partials through R-free products afterwards.
Sets are taken a batch of draws at a time (the batch bounds memory, not R) and grouped by their
size, so every product is on a stacked (n_sets, J, .) array. Tested equal to the model's
reference probabilities (dual operations over the (draw, row) axis).
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Workspace
from estpipe.kernel.request import Request
from estpipe.kernel import tiles
from estpipe.kernel.tiles import TileData

# Bytes of one (sets, J, draws) array per batch: the batch of draws is chosen to fit it.
BATCH_BYTES = 8 * 2**20
# Row-draws per tile (the tile's rows times R), and the fewest rows a tile holds.
TILE_ROW_DRAWS = 2**20
MIN_TILE_ROWS = 256
# Below this |utility| exp cannot overflow and no set's sum can underflow (kernel/fused_logit.py).
SAFE_UTILITY = 600.0


class FusedMixed:
    """The strategy for models.MixedLogit. Its pullback is the forward projection of v'h."""

    name = "fused-mixed-logit"
    reverse = False

    def __init__(self, model):
        self.model = model
        self._groups: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray]]] = {}

    @property
    def tile_rows(self) -> int:
        """A row costs R row-draws here, so tiles (and value stripes) hold fewer rows than the
        logit's: enough tiles for every thread, each still one batch of draws or more (never more
        rows than the logit's tiles.DEFAULT_TILE_ROWS, read when the kernel is built)."""
        return int(min(tiles.DEFAULT_TILE_ROWS, max(MIN_TILE_ROWS, TILE_ROW_DRAWS // max(1, self.model.draws.R))))

    # -- layout -----------------------------------------------------------------------------------
    def groups(self, tile: TileData) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The tile's sets by size: (J, set indices (n,), row indices (n, J)), made once per tile."""
        key = (id(tile.X), tile.seg.n_sets)
        cached = self._groups.get(key)
        if cached is None:
            seg = tile.seg
            cached = []
            for J in np.unique(seg.sizes):
                sets = np.flatnonzero(seg.sizes == J)
                rows = seg.starts[sets][:, None] + np.arange(J)[None, :]
                cached.append((int(J), sets, rows))
            self._groups[key] = cached
        return cached

    # -- the simulated probabilities and their partials -------------------------------------------------
    def simulate(self, tile: TileData, params: np.ndarray, jacobian: bool):
        """sbar (rows,) and, with the Jacobian, dsbar/dtheta (rows, P)."""
        m = self.model
        rows, K = tile.X.shape
        P = m.n_params(K)
        random = m.random
        rcols = np.array([r.column for r in random])
        fcols = np.array([k for k in range(K) if k not in set(rcols.tolist())], dtype=np.int64)
        pairs = m._spread_pairs()
        L = np.zeros((m.Kr, m.Kr))
        for j, (i, l) in enumerate(pairs):
            L[i, l] = params[K + j]
        means = params[rcols]
        signs = np.array([r.sign for r in random], dtype=np.float64)
        lognormal = signs != 0
        # the parameters moved with weight 1 (fixed coefficients, normal means) and the weighted
        # ones: (parameter, random index i, weight kind, l)
        ones = [int(k) for k in fcols] + [int(r.column) for r in random if not r.sign]
        weighted = [(int(r.column), i, "beta", -1) for i, r in enumerate(random) if r.sign]
        weighted += [(K + j, i, "beta_eta" if random[i].sign else "eta", l) for j, (i, l) in enumerate(pairs)]
        sbar = np.zeros(rows)
        dsbar = np.zeros((rows, P)) if jacobian else None
        R = m.draws.R
        for J, sets, row_idx in self.groups(tile):
            n = len(sets)
            Xg = tile.X[row_idx]  # (n, J, K)
            Xr = Xg[:, :, rcols]  # (n, J, Kr)
            v = Xg[:, :, fcols] @ params[fcols] if len(fcols) else np.zeros((n, J))
            v_bound = np.abs(v).max(initial=0.0)
            x_bound = np.abs(Xr).sum(axis=2).max(initial=0.0)  # max over rows of sum_k |x_k|
            units, inverse = np.unique(tile.unit[sets], return_inverse=True)
            identity = len(units) == n and bool(np.all(inverse == np.arange(n)))  # every set its own unit
            step = max(1, min(R, BATCH_BYTES // (8 * n * J)))
            s_sum = np.zeros((n, J))
            if jacobian:
                SS = np.zeros((n, J, J))
                A = np.zeros((n, J, len(weighted)))
                T2 = np.zeros((n, J, len(weighted)))
            for r0 in range(0, R, step):
                r1 = min(R, r0 + step)
                eta = m.draws.normals(units, r0, r1)
                if not identity:
                    eta = eta[inverse]  # (n, B, Kr): each set's unit's draws
                if m.correlated:
                    z = (eta.reshape(-1, m.Kr) @ L.T).reshape(eta.shape)
                    z += means
                else:
                    z = eta * np.diag(L)
                    z += means
                beta = z  # normal coefficients; lognormal ones, in place:
                for i in np.flatnonzero(lognormal):
                    beta[:, :, i] = signs[i] * np.exp(z[:, :, i])
                # (J, Kr) @ (Kr, B) per set, with beta transposed to contiguous first: twice as
                # fast as the strided operand (measured at 2,000 sets x 10 x 50 draws)
                u = np.matmul(Xr, np.ascontiguousarray(beta.transpose(0, 2, 1)))  # (n, J, B)
                u += v[:, :, None]
                # Shifting by each set's maximum keeps exp in range for any utility but costs two
                # passes; a bound on |u| from |v| and |x| |beta| says when it can be skipped.
                if not float(v_bound) + float(np.abs(beta).max()) * float(x_bound) < SAFE_UTILITY:
                    u -= u.max(axis=1, keepdims=True)
                np.exp(u, out=u)
                inv_total = 1.0 / u.sum(axis=1)  # (n, B)
                if not jacobian:
                    s_sum += np.einsum("njb,nb->nj", u, inv_total)
                    continue
                u *= inv_total[:, None, :]
                S = u
                s_sum += S.sum(axis=2)
                SS += S @ S.transpose(0, 2, 1)
                if weighted:
                    C = S.transpose(0, 2, 1) @ Xr  # (n, B, Kr): c_rk
                    W = np.empty((n, r1 - r0, len(weighted)))
                    for q, (_, i, kind, l) in enumerate(weighted):
                        if kind == "beta":
                            W[:, :, q] = beta[:, :, i]
                        elif kind == "eta":
                            W[:, :, q] = eta[:, :, l]
                        else:
                            W[:, :, q] = beta[:, :, i] * eta[:, :, l]
                    A += S @ W
                    Cw = W * C[:, :, [i for _, i, _, _ in weighted]]
                    T2 += S @ Cw
            flat = row_idx.ravel()
            sb = s_sum / R
            sbar[flat] = sb.ravel()
            if jacobian:
                omega = -SS / R
                omega[:, np.arange(J), np.arange(J)] += sb
                if ones:
                    dsbar[flat[:, None], np.array(ones)[None, :]] = (omega @ Xg[:, :, ones]).reshape(n * J, -1)
                for q, (p, i, _, _) in enumerate(weighted):
                    dsbar[flat, p] = ((A[:, :, q] * Xr[:, :, i] - T2[:, :, q]) / R).ravel()
        return sbar, dsbar

    # -- the strategy protocol ------------------------------------------------------------------------
    def tile_sums(self, tile: TileData, dm, request: Request, ws: Workspace, acc, need_h: bool, chosen=None,
                  prescale: bool = False):
        sbar, dsbar = self.simulate(tile, np.asarray(request.params, dtype=np.float64), request.jacobian)
        acc[:, 0] += sbar @ dm
        if request.jacobian:
            if request.seed_scale is not None:
                dsbar /= request.seed_scale
            acc[:, 1:] += (dsbar.T @ dm).T
        H = None
        if need_h:
            seg = tile.seg
            H = np.add.reduceat(sbar[:, None] * dm, seg.starts, axis=0)
        loglik = 0.0
        if chosen is not None:
            loglik = float(np.sum(np.log(np.maximum(sbar[chosen[0]], np.finfo(float).tiny))))
        return H, loglik

    def tile_values(self, tile: TileData, dm, request: Request, ws: Workspace, acc, tape=None) -> None:
        sbar, _ = self.simulate(tile, np.asarray(request.params, dtype=np.float64), False)
        acc[:, 0] += sbar @ dm

    def tile_pullback(self, tile: TileData, dm, request: Request, v, ws: Workspace, acc, tape=None,
                      prescale: bool = False) -> None:
        _, dsbar = self.simulate(tile, np.asarray(request.params, dtype=np.float64), True)
        if request.seed_scale is not None:
            dsbar /= request.seed_scale
        acc += (dm @ v) @ dsbar
