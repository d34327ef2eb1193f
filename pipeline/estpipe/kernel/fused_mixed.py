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
# Bytes of one (sets, P, draws) array of the exact Hessian's batch: under the 32 MiB glibc serves
# from its kept heap (kernel/blas.py keep_freed_memory), so that no batch maps and faults in fresh pages.
HESSIAN_BATCH_BYTES = 16 * 2**20
# Row-draws per tile (the tile's rows times R), and the fewest rows a tile holds.
TILE_ROW_DRAWS = 2**20
MIN_TILE_ROWS = 256
# Below this |utility| exp cannot overflow and no set's sum can underflow (kernel/fused_logit.py).
SAFE_UTILITY = 600.0
# Below this |utility| no choice probability is under exp(-2 x 300 - log J), far from underflow:
# a decision maker of one set then has exp(l_ur) = s_chosen,r itself, and its simulated likelihood
# needs no log and no exp per draw (simulated_likelihood_tile, "linear").
TAME_UTILITY = 300.0


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


# -- the simulated likelihood -------------------------------------------------------------------------
class _Layout:
    """What simulated_likelihood_tile needs of a tile that no parameter changes: the chosen rows
    y (rows,) and their count per set, the units (first set of each, ids, each set's unit), the
    random columns Xr and y'Xr per set, the bound on |x_r| per row, the fixed columns, and the
    sets grouped by size with their rows, Xr, y, chosen count, unit and chosen row's place.
    Made once per tile (and set of random columns), kept on the tile's view, which the kernel
    holds for its lifetime: an evaluation then does only the work the parameters change."""

    def __init__(self, tile: TileData, chosen, rcols: np.ndarray):
        seg = tile.seg
        rows_n, K = tile.X.shape
        self.y = y = np.zeros(rows_n)
        np.add.at(y, chosen[0], 1.0)
        self.ybar = ybar = np.add.reduceat(y, seg.starts) if seg.n_sets else np.zeros(0)  # chosen rows per set
        unit = np.asarray(tile.unit)  # the tile's units: contiguous runs of sets (tiles hold whole units)
        self.ustart = ustart = (np.flatnonzero(np.r_[True, unit[1:] != unit[:-1]]) if len(unit)
                                else np.zeros(0, dtype=np.int64))
        self.units = unit[ustart]
        self.own = len(ustart) == seg.n_sets  # every set its own unit (no panel): no sums over a unit's sets
        self.unit_of_set = np.repeat(np.arange(len(ustart)), np.diff(np.r_[ustart, len(unit)]))
        rset = set(rcols.tolist())
        self.fixed = np.array([k for k in range(K) if k not in rset], dtype=np.int64)
        self.Xr = Xr = tile.X[:, rcols]
        self.x_bound = float(np.abs(Xr).sum(axis=1).max(initial=0.0))
        # y'x_k per set for the random columns (the weighted parameters' first term)
        self.yXr = np.add.reduceat(y[:, None] * Xr, seg.starts, axis=0) if seg.n_sets else np.zeros((0, len(rcols)))
        self.one_each = bool(np.all(ybar == 1.0))
        self.groups, self.pos_of = [], {}
        for J in np.unique(seg.sizes):
            sets = np.flatnonzero(seg.sizes == J)
            row_idx = seg.starts[sets][:, None] + np.arange(J)[None, :]
            yg = y[row_idx]
            self.groups.append((int(J), sets, row_idx, Xr[row_idx], yg, ybar[sets], self.unit_of_set[sets]))
            if self.one_each:
                self.pos_of[int(J)] = np.argmax(yg, axis=1)  # the chosen row's place per set


def _likelihood_layout(tile: TileData, chosen, rcols: np.ndarray) -> _Layout:
    key = tuple(int(c) for c in rcols)
    cache = tile.__dict__.setdefault("_likelihood_layouts", {})
    if key not in cache:
        cache[key] = _Layout(tile, chosen, rcols)
    return cache[key]


def has_exact_hessian(model) -> bool:
    """Whether simulated_likelihood_tile gives the exact Hessian of this model's simulated
    log-likelihood: every random coefficient normal (the utilities are then linear in the
    parameters draw by draw; a lognormal's are not, and it takes differences of the score)."""
    return not any(r.sign for r in model.random)


def simulated_likelihood_tile(model, tile: TileData, params, chosen, batch_bytes: int = BATCH_BYTES,
                              hessian: bool = False):
    """The simulated log-likelihood of the tile's units and their scores (DESIGN.md, "Simulated
    maximum likelihood"): (loglik, loglik_null, n_chosen, S) with S (n_sets, P) holding each
    unit's score on the unit's first set (zeros elsewhere), so that sums over sets are sums over
    units (kernel/likelihood.py adds them up per unit and per cluster).

    Per unit u and draw r, l_ur = sum_{t in u} log s_t,chosen(r), the log-probability of the
    unit's whole sequence of choices; the unit's simulated likelihood is
    L_u = (1/R) sum_r exp(l_ur), accumulated in logs (a running maximum per unit, rescaled
    batch by batch: products of many probabilities underflow). The score is the posterior
    mean over draws of dl_ur/dtheta, with weights w_ur = exp(l_ur) / sum_r exp(l_ur):

        d log L_u / d theta_p = sum_r w_ur sum_t w_urp (y_t - s_tr)' x_t,k(p)

    with w_urp the weight of parameter p in draw r's coefficient (1 for a fixed coefficient or
    a normal mean; eta_l for a spread entry L_il; beta_i, beta_i eta_l for a lognormal's b and
    spread). Where w_urp = 1 the draws enter only through q_t = sum_r w_ur s_tr, accumulated
    over the draws like L_u, so those K columns cost one product with X at the end; the
    weighted ones through c_trk = s_tr' x_tk for the random columns only.

    params: (P,) float, or complex for complex steps (every operation is analytic: the shifts
    are taken from real parts); chosen: (rows, sets) the tile's chosen rows and their sets.

    hessian (real params, every coefficient normal: has_exact_hessian): also the exact
    d2 loglik / dtheta2 (P, P) summed over the tile's units, as a fifth element. With every
    coefficient normal, draw r's utilities are linear in theta, z_tjr,p = x_tj,k(p) e_r,c(p)
    (e_r0 = 1, e_r,l+1 = eta_rl), so

        d2 log L_u = sum_r w_ur (H_ur + g_ur g_ur') - g_u g_u'
        H_ur = -sum_t ybar_t (sum_j s_tjr z_tjr z_tjr' - zbar_tr zbar_tr'),  zbar_tr = s_tr' z_tr
        g_ur = sum_t (y_t - ybar_t s_tr)' z_tr

    accumulated over the batches of draws like the score: sum_r w_ur sum_j s_tjr z z' through
    Omega_tj[c, d] = sum_r w_ur s_tjr e_rc e_rd (one product over the draws per set), the
    zbar zbar' and g g' terms through (P, B) x (B, P) products per set and per unit. Measured
    against the P evaluations of forward differences in scripts/bench_peers_mle.py (DESIGN,
    "Simulated maximum likelihood")."""
    m = model
    rows_n, K = tile.X.shape
    seg = tile.seg
    params = np.asarray(params)
    dtype = np.result_type(params.dtype, np.float64)
    P = m.n_params(K)
    random = m.random
    rcols = np.array([r.column for r in random], dtype=np.int64)
    pairs = m._spread_pairs()
    L = np.zeros((m.Kr, m.Kr), dtype=dtype)
    for j, (i, l) in enumerate(pairs):
        L[i, l] = params[K + j]
    means = params[rcols]
    signs = np.array([r.sign for r in random], dtype=np.float64)
    lognormal = np.flatnonzero(signs != 0)
    lognormal_cols = {int(rcols[i]) for i in lognormal}
    ones = [k for k in range(K) if k not in lognormal_cols]
    weighted = [(int(r.column), i, "beta", -1) for i, r in enumerate(random) if r.sign]
    weighted += [(K + j, i, "beta_eta" if random[i].sign else "eta", l) for j, (i, l) in enumerate(pairs)]
    R = m.draws.R
    want_h = bool(hessian) and not len(lognormal) and not np.iscomplexobj(params)

    c_rows, c_sets = chosen
    lay = _likelihood_layout(tile, chosen, rcols)
    y, ybar, ustart, units, unit_of_set, Xr, yXr = lay.y, lay.ybar, lay.ustart, lay.units, lay.unit_of_set, lay.Xr, lay.yXr
    n_u, own, x_bound, one_each, pos_of = len(units), lay.own, lay.x_bound, lay.one_each, lay.pos_of
    fixed = lay.fixed
    v = tile.X[:, fixed] @ params[fixed] if len(fixed) else np.zeros(rows_n, dtype=dtype)
    v_bound = float(np.abs(v).max(initial=0.0))
    groups = [(J, sets, row_idx, Xg, v[row_idx], yg, yb, us) for J, sets, row_idx, Xg, yg, yb, us in lay.groups]

    mx = np.full(n_u, -np.inf)  # running maximum of l_ur over the draws so far (real)
    ml = np.zeros(n_u)  # the same as exp(l_ur), when linear
    linear = False
    tot = np.zeros(n_u, dtype=dtype)  # sum_r exp(l_ur - mx)
    Qg = [np.zeros((len(g[1]), g[0]), dtype=dtype) for g in groups]  # per group: sum_r exp(l_ur - mx) s_tr
    Gw = np.zeros((n_u, len(weighted)), dtype=dtype)  # sum_r exp(l_ur - mx) dl_ur/dtheta_p, weighted p
    step = max(1, min(R, batch_bytes // (8 * max(1, rows_n, seg.n_sets * max(1, m.Kr)))))
    if want_h:  # (sets, draws, P) arrays per batch
        step = max(1, min(step, (HESSIAN_BATCH_BYTES * batch_bytes // BATCH_BYTES) // (8 * max(1, seg.n_sets * P))))
        kP = np.r_[np.arange(K), [int(rcols[i]) for i, _ in pairs]].astype(np.int64)  # the column p moves
        cP = np.r_[np.zeros(K, dtype=np.int64), [l + 1 for _, l in pairs]].astype(np.int64)  # its draw weight
        C = m.Kr + 1
        Xfull = [tile.X[g[2]][:, :, kP] for g in lay.groups]  # (n, J, P): x_tj,k(p)
        yXP = (np.add.reduceat(y[:, None] * tile.X, seg.starts, axis=0)[:, kP] if seg.n_sets
               else np.zeros((0, P)))  # y_t'x_t,k(p) per set
        Hu = np.zeros((n_u, P, P))
    # With every spread entry 0 (the logit: a mixed logit's default start is a logit fit) no
    # utility depends on the draw, every w_ur is 1/R, and the weighted scores are linear in eta:
    # one "draw", the units' mean eta, gives the likelihood and every score exactly.
    degenerate = not np.any(L) and not want_h  # the Hessian needs every draw (E[eta eta'], not E[eta]^2)
    if degenerate:
        eta_mean = m.mean_draws(units)
    if not len(lognormal):  # per group: X_r L (n, J, Kr) and v + X_r mean (n, J)
        XL = [g[3] @ L if m.correlated else g[3] * np.diag(L)[None, None, :] for g in groups]
        vm = [g[4] + g[3] @ means for g in groups]
    lp = np.empty((seg.n_sets, step), dtype=dtype)  # log s_chosen per set and draw
    A = np.empty((m.Kr, seg.n_sets, step), dtype=dtype) if weighted else None  # y'x - ybar s_r'x, random columns
    for r0 in range(0, 1 if degenerate else R, step):
        r1 = min(R, r0 + step)
        if degenerate:
            r1 = r0 + 1
            eta = eta_mean[:, :, None]
        else:
            eta = m.unit_draws(units, r0, r1)  # (n_u, Kr, B): draws last, so each coefficient's row is contiguous
        B = r1 - r0
        if len(lognormal):
            if m.correlated:
                z = np.einsum("il,ulb->uib", L, eta)
            else:
                z = eta * np.diag(L)[None, :, None]
            z += means[None, :, None]
            beta = z  # (n_u, Kr, B)
            for i in lognormal:
                beta[:, i, :] = signs[i] * np.exp(z[:, i, :])
        else:
            # every coefficient normal: x'beta_r = x'mean + (x'L) eta_r, so the draws enter the
            # utilities as they are (no (units, Kr, draws) array of coefficients is made)
            beta = None
        # |beta| from the parameters and the largest |eta| the draws can take (no pass over beta)
        spread = np.abs(L).sum(axis=1).real * (m.draws.max_abs if not degenerate else np.abs(eta_mean).max(initial=0.0))
        reach = np.abs(means.real) + spread
        reach = np.where(signs != 0, np.exp(np.minimum(reach, 700.0)), reach)
        bound = v_bound + float(reach.max(initial=0.0)) * x_bound
        safe = bound < SAFE_UTILITY
        # every unit one set with one chosen row, utilities tame: l_ur = log s_chosen,r is not
        # needed, exp(l_ur) is the probability itself (a log and an exp per draw saved)
        linear = own and one_each and bound < TAME_UTILITY  # the same in every batch (no draw enters bound)
        probs = []
        lpb = lp[:, :B]
        for gi, (J, sets, row_idx, Xg, vg, yg, yb, us) in enumerate(groups):
            whole = own and len(sets) == seg.n_sets
            if beta is not None:
                bu = beta if whole else beta[us]  # (n, Kr, B): each set's unit's
                u = np.matmul(Xg, bu)  # (n, J, B)
                u += vg[:, :, None]
            else:
                u = np.matmul(XL[gi], eta if whole else eta[us])  # (n, J, B)
                u += vm[gi][:, :, None]
            if not safe:  # shift by each set's maximum only where exp could overflow (fused_logit.py)
                shift = u.real.max(axis=1, keepdims=True)
                u -= shift
            if not linear:  # the chosen rows' utility: a gather when one per set, not a sum over J
                lpg = u[np.arange(len(sets)), pos_of[J]] if one_each else np.einsum("nj,njb->nb", yg, u)
            e = np.exp(u, out=u)
            total = e.sum(axis=1)  # (n, B)
            if not linear:  # sum_j y_j u_j - ybar log sum_j exp(u_j); shifts cancel
                lpg -= np.log(total) if one_each else yb[:, None] * np.log(total)
            e *= (1.0 / total)[:, None, :]
            probs.append(e)  # s_tr
            lpb[sets] = e[np.arange(len(sets)), pos_of[J]] if linear else lpg  # s_chosen,r, or its log
            if weighted:
                for i in range(m.Kr):  # c_ri = s_r' x_i per set and draw, by a product over J
                    Ai = np.einsum("njb,nj->nb", e, Xg[:, :, i])
                    Ai *= -yb[:, None]
                    Ai += yXr[sets, i][:, None]
                    A[i, sets, :B] = Ai
        lu = lpb if own else np.add.reduceat(lpb, ustart, axis=0)  # (n_u, B): l_ur, or exp(l_ur) when linear
        if linear:  # the same running sums with the maximum in linear scale (ml; mx = log ml at the end)
            new = np.maximum(ml, lu.real.max(axis=1))
            rescale = ml / new
            ml = new
            w = lu / ml[:, None]
        else:
            new = np.maximum(mx, lu.real.max(axis=1))
            rescale = np.where(np.isfinite(mx), np.exp(mx - new), 0.0)
            mx = new
            w = np.exp(lu - mx[:, None])  # (n_u, B)
        tot = tot * rescale + w.sum(axis=1)
        for (J, sets, row_idx, Xg, vg, yg, yb, us), e, Q in zip(groups, probs, Qg):
            Q *= rescale[us][:, None]
            Q += np.einsum("njb,nb->nj", e, w[us])
        if weighted:
            Au = A[:, :, :B] if own else np.add.reduceat(A[:, :, :B], ustart, axis=1)  # (Kr, n_u, B)
            Gw *= rescale[:, None]
            wA = w[None] * Au  # w_ur A_uri
            for q, (_, i, kind, l) in enumerate(weighted):
                if kind == "beta":
                    W = beta[:, i, :]
                elif kind == "eta":
                    W = eta[:, l, :]
                else:
                    W = beta[:, i, :] * eta[:, l, :]
                Gw[:, q] += np.einsum("ub,ub->u", W, wA[i])
        if want_h:
            _hessian_batch(Hu, rescale, w, eta, C, cP, K, groups, probs, Xfull, yXP, ustart, own, one_each, seg.n_sets, P)
    if linear:
        mx = np.log(ml)
    loglik_u = mx + np.log(tot) - (0.0 if degenerate else np.log(R))
    q = np.empty(rows_n, dtype=dtype)
    for (J, sets, row_idx, *_), Q in zip(groups, Qg):
        q[row_idx.ravel()] = (Q / tot[unit_of_set[sets]][:, None]).ravel()
    # per set: (y - q)' X for the columns moved with weight one
    S = np.zeros((seg.n_sets, P), dtype=dtype)
    if ones:
        per_set = np.add.reduceat((y - q)[:, None] * tile.X[:, ones], seg.starts, axis=0)
        S[ustart[:, None], np.array(ones)[None, :]] = per_set if own else np.add.reduceat(per_set, ustart, axis=0)
    for qi, (p, _, _, _) in enumerate(weighted):
        S[ustart, p] = Gw[:, qi] / tot
    null = -float(np.sum(np.log(seg.sizes[c_sets]))) if len(c_sets) else 0.0
    if not hessian:
        return np.sum(loglik_u), null, len(c_rows), S
    H = None
    if want_h:
        gu = S[ustart]  # (n_u, P) the units' scores
        H = np.einsum("upq,u->pq", Hu, 1.0 / tot) - gu.T @ gu
        H = (H + H.T) / 2
    return np.sum(loglik_u), null, len(c_rows), S, H


def _hessian_batch(Hu, rescale, w, eta, C, cP, K, groups, probs, Xfull, yXP, ustart, own, one_each, n_sets, P):
    """One batch of draws' share of sum_r w_ur (H_ur + g_ur g_ur') per unit, added to Hu
    (n_u, P, P) after rescaling it like the other running sums (simulated_likelihood_tile).
    The products over the draws are weighted by sqrt(w) on both sides (A'A: numpy's matmul then
    takes BLAS's symmetric rank-k update), and a spread parameter's weight eta_rl multiplies
    only its own columns (the other columns' weight is 1)."""
    n_u, B = w.shape
    Hu *= rescale[:, None, None]
    # e_rc e_rd (e_r0 = 1) for c <= d, draws last: (n_u, pairs, B)
    pairs = [(c, d) for c in range(C) for d in range(c, C)]
    pair_of = np.empty((C, C), dtype=np.int64)
    F = np.empty((n_u, len(pairs), B))
    for i, (c, d) in enumerate(pairs):
        pair_of[c, d] = pair_of[d, c] = i
        if c == 0:
            F[:, i] = 1.0 if d == 0 else eta[:, d - 1]
        else:
            np.multiply(eta[:, c - 1], eta[:, d - 1], out=F[:, i])
    pair_pq = pair_of[cP[:, None], cP[None, :]]  # (P, P): which Omega entry weighs z_p z_q
    sw = np.sqrt(w)
    eta_p = eta[:, cP[K:] - 1, :]  # (n_u, spreads, B): e_r,c(p) for p >= K
    T = A = None  # per set: ybar_t (sum_r w_ur sum_j s z z' - sum_r w_ur zbar zbar') (n_sets, P, P), and
    # (y_t - ybar_t s_tr)' z_tr (n_sets, P, B), draws last (contiguous products); one group of all
    # sets (every set its own unit) makes them directly
    for (J, sets, row_idx, Xg, vg, yg, yb, us), e, Xt in zip(groups, probs, Xfull):
        whole = own and len(sets) == n_sets
        wg, swg, Fg, eg = (w, sw, F, eta_p) if whole else (w[us], sw[us], F[us], eta_p[us])
        Om = np.matmul(e * wg[:, None, :], Fg.transpose(0, 2, 1))  # (n, J, pairs): Omega_tj
        M = np.einsum("njp,njq,njpq->npq", Xt, Xt, Om[:, :, pair_pq])  # sum_r w_ur sum_j s z z'
        Z = np.matmul(Xt.transpose(0, 2, 1), e)  # (n, P, B): s_tr' x_t,k(p)
        Zs = Z * swg[:, None, :]
        Zs[:, K:] *= eg  # sqrt(w_ur) zbar_tr
        M -= np.matmul(Zs, Zs.transpose(0, 2, 1))
        # (y_t - ybar_t s_tr)' z_tr = e_r,c(p) (y_t'x_t,k(p) - ybar_t s_tr' x_t,k(p))
        if one_each:
            np.subtract(yXP[sets][:, :, None], Z, out=Z)
        else:
            M *= yb[:, None, None]
            Z *= -yb[:, None, None]
            Z += yXP[sets][:, :, None]
        Z[:, K:] *= eg
        if whole:
            T, A = M, Z
        else:
            if T is None:
                T, A = np.empty((n_sets, P, P)), np.empty((n_sets, P, B))
            T[sets] = M
            A[sets] = Z
    Au = A if own else np.add.reduceat(A, ustart, axis=0)  # g_ur (n_u, P, B)
    Au *= sw[:, None, :]
    Hu += np.matmul(Au, Au.transpose(0, 2, 1))
    Hu -= T if own else np.add.reduceat(T, ustart, axis=0)
