"""The additive sums of a log-likelihood (request quantity "likelihood"; DESIGN.md, "Maximum
likelihood").

Per tile: the model's log_probabilities, seeded as one dual block over all P parameters (the
partials are the scores), read at the chosen rows; per set, the chosen rows' log-probability and
score are added; per independent unit (the panel unit when the file has one, else the set) the
scores are summed, and their outer products give the OPG; the clusters' sums give the clustered
OPG. Units and clusters may span tiles (never partitions): kernel/units.py joins them. Works for
every model, whatever the kernel's own strategy for moments. A simulated model (mixed logit:
`model.simulated`) gives the log of its simulated probability of each unit's whole sequence of
choices instead (kernel/fused_mixed.py simulated_likelihood_tile), its score on the unit's first
set. With complex parameters (complex steps) loglik stays complex.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from estpipe.dual import Workspace, seed
from estpipe.kernel.fused_logit import FusedLogit, logit_probabilities
from estpipe.kernel.fused_mixed import has_exact_hessian, simulated_likelihood_tile
from estpipe.kernel.tiles import TileData
from estpipe.kernel.units import UnitSums
from estpipe.models.base import Model, call_model


@dataclass(eq=False)
class LikelihoodSums:
    """Sums over the choice sets of one partition (or of many, once added); P parameters.

    n_sets: sets; n_chosen: chosen rows; loglik: sum of log s over the chosen rows; loglik_null:
    the same with equal probabilities (sum of -log J_i over the chosen rows' sets); score: (P,)
    sum of the scores (None when not requested); opg: (P, P) sum over units u of s_u s_u' (s_u:
    the unit's score sum; None when not requested);
    n_units: units; opg_cluster: (P, P) the same over the file's clusters, or None when the
    request did not use them; n_clusters: clusters (0 without). Partials are with respect to
    beta = seed_scale * params when the request had a seed scale."""

    n_sets: int
    n_chosen: int
    loglik: float
    loglik_null: float
    score: np.ndarray | None
    opg: np.ndarray | None
    n_units: int
    opg_cluster: np.ndarray | None = None
    n_clusters: int = 0
    hessian: np.ndarray | None = None  # (P, P) d2 loglik / d beta2, exact, when requested and the kernel has it
    # whether the kernel has the exact Hessian (whether or not this request asked for it): the
    # optimizer learns it from its first evaluation without paying for one
    has_hessian: bool = False
    # whether the per-unit scores come with the score at no extra pass over the data (every kernel
    # but the fused logit's, which makes per-set scores only for the OPG): the optimizer then asks
    # for the OPG with every score, so BHHH's polish after BFGS needs no evaluation of its own
    opg_with_score: bool = False

    def __add__(self, other: "LikelihoodSums") -> "LikelihoodSums":
        if isinstance(other, int) and other == 0:  # lets sum() start from 0
            return self

        def plus(a, b):
            return None if a is None or b is None else a + b

        return LikelihoodSums(
            n_sets=self.n_sets + other.n_sets, n_chosen=self.n_chosen + other.n_chosen,
            loglik=self.loglik + other.loglik, loglik_null=self.loglik_null + other.loglik_null,
            score=plus(self.score, other.score), opg=plus(self.opg, other.opg), n_units=self.n_units + other.n_units,
            opg_cluster=plus(self.opg_cluster, other.opg_cluster), n_clusters=self.n_clusters + other.n_clusters,
            hessian=plus(self.hessian, other.hessian), has_hessian=self.has_hessian and other.has_hessian,
            opg_with_score=self.opg_with_score and other.opg_with_score)

    __radd__ = __add__

    def restricted(self, free: np.ndarray) -> "LikelihoodSums":
        """The sums of the parameters `free` only (the others held fixed:
        estimation.gmm.FixedParameters): the score's entries, the OPGs' and Hessian's blocks."""
        f = np.asarray(free)

        def block(a):
            return None if a is None else a[np.ix_(f, f)]

        return replace(self, score=None if self.score is None else self.score[f], opg=block(self.opg),
                       opg_cluster=block(self.opg_cluster), hessian=block(self.hessian))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.score, self.opg, self.opg_cluster) if a is not None) + 48


def likelihood_tile(model: Model, params, tile: TileData, ws: Workspace, chosen, seed_scale=None, score: bool = True):
    """This tile's (loglik, loglik_null, n_chosen, S) with S (n_sets_tile, P) the per-set score
    sums (None without `score`: then the model is evaluated with no partials at all);
    chosen: (rows, sets) the tile's chosen rows and the tile-local set of each."""
    rows, sets = chosen
    P = len(params) if score else 0
    ws.reset()
    theta = seed(params, ws, 0, P, seed_scale)
    logs = call_model(model, "log_probabilities", theta, tile)
    a = np.asarray(logs.a)[rows]  # (n_chosen, 1 + P)
    S = None
    if score:
        S = np.zeros((tile.seg.n_sets, P), dtype=a.dtype)
        np.add.at(S, sets, a[:, 1:])
    null = -float(np.sum(np.log(tile.seg.sizes[sets])))
    ll = np.sum(a[:, 0])
    return (ll if np.iscomplexobj(ll) else float(ll)), null, len(rows), S


def _per_set(w: np.ndarray, X: np.ndarray, seg) -> np.ndarray:
    """sum over each set's rows of w x (n_sets, K); for sets of one size a batched product, with
    no (rows, K) temporary."""
    if not seg.n_sets:
        return np.zeros((0, X.shape[1]))
    J = seg.equal_size
    if J:
        return np.einsum("nj,njk->nk", w.reshape(-1, J), X.reshape(-1, J, X.shape[1]))
    return np.add.reduceat(w[:, None] * X, seg.starts, axis=0)


def fused_logit_likelihood_tile(tile: TileData, params, ws: Workspace, chosen, seed_scale=None,
                                score: bool = True, per_set: bool = True, hessian: np.ndarray | None = None):
    """The textbook logit's (loglik, loglik_null, n_chosen, S, score) by hand: s from
    fused_logit.logit_probabilities, the residual r = y - s, the score X'r by one GEMV and, with
    per_set (for the OPG), the per-set scores S = sum over each set's rows of r x (n_sets, K).
    Partials with respect to beta = seed_scale * params when a seed scale is given."""
    rows, sets = chosen
    X, seg = tile.X, tile.seg
    ws.reset()
    s, ll = logit_probabilities(X, np.asarray(params, dtype=np.float64), seg, ws, chosen)
    null = -float(np.sum(np.log(seg.sizes[sets])))
    if hessian is not None:
        # d2 loglik / db2 = -sum_i X_i'(diag(s_i) - s_i s_i')X_i = -[(X o s)'X - sum_i c_i c_i'], c_i = X_i's_i
        C = _per_set(s, X, seg)
        H = C.T @ C - (X * s[:, None]).T @ X
        if seed_scale is not None:
            H /= np.outer(seed_scale, seed_scale)
        hessian += H
    if not score:
        return ll, null, len(rows), None, None
    np.negative(s, out=s)
    np.add.at(s, rows, 1.0)  # r = y - s
    total = X.T @ s
    S = _per_set(s, X, seg) if per_set else None
    if seed_scale is not None:
        total = total / seed_scale
        S = None if S is None else S / seed_scale
    return ll, null, len(rows), S, total


def _scalar(x):
    return x if np.iscomplexobj(x) else float(x)


def _n_runs(ids: np.ndarray | None, n: int) -> int:
    """Units in a partition: runs of equal ids (contiguous), or n when there are none."""
    if ids is None:
        return n
    return int(np.count_nonzero(np.r_[True, ids[1:] != ids[:-1]])) if len(ids) else 0


def likelihood_sums(kernel, request) -> LikelihoodSums:
    """The partition's LikelihoodSums at request.params for kernel (engine.PartitionKernel), on
    its tile threads: the log-likelihood, with request.score the score, with request.opg the
    OPG over units (the panel units, else the sets) and over clusters when the request is
    clustered and the data have them. The textbook logit at real parameters takes the fused
    path (fused_logit_likelihood_tile); a simulated model its own (module docstring)."""
    d = kernel.data
    if d.chosen is None:
        raise ValueError("a likelihood needs the chosen rows; these data have none")
    P = kernel.n_params
    dtype = np.complex128 if request.complex_step else np.float64
    cluster = d.cluster if (request.clustered and d.cluster is not None) else None
    index = kernel._tile_index
    simulated = getattr(kernel.model, "simulated", False)
    fused = isinstance(kernel.strategy, FusedLogit) and not request.complex_step
    want_score, want_opg = request.score, request.opg
    has_hessian = not request.complex_step and (fused or (simulated and has_exact_hessian(kernel.model)))
    exact_hessian = request.hessian and has_hessian

    def work(ws, tiles):
        total = [0.0, 0.0, 0]
        H = np.zeros((P, P)) if exact_hessian else None
        score = np.zeros(P, dtype=dtype)
        units = UnitSums.empty(P, dtype) if want_opg else None
        clusters = UnitSums.empty(P, dtype) if (cluster is not None and want_opg) else None
        for tile in tiles:
            i = index[tile.set_start]
            chosen = kernel._chosen[i]
            if simulated:
                out = simulated_likelihood_tile(kernel.model, kernel.view(tile), request.params, chosen,
                                                hessian=exact_hessian)
                ll, null, n, S = out[:4]
                if request.seed_scale is not None:
                    S = S / request.seed_scale
                if exact_hessian:
                    H += out[4] if request.seed_scale is None else out[4] / np.outer(request.seed_scale,
                                                                                     request.seed_scale)
                tile_score = S.sum(axis=0)
            elif fused:
                ll, null, n, S, tile_score = fused_logit_likelihood_tile(kernel.view(tile), request.params, ws, chosen,
                                                                          request.seed_scale, want_score, want_opg, H)
            else:
                ll, null, n, S = likelihood_tile(kernel.model, request.params, kernel.view(tile), ws, chosen,
                                                 request.seed_scale, want_score)
                tile_score = None if S is None else S.sum(axis=0)
            total[0] += ll
            total[1] += null
            total[2] += n
            if want_score:
                score += tile_score
            if units is not None:
                units.add_tile(i, S, None if d.panel is None else d.panel[tile.set_start : tile.set_stop])
            if clusters is not None:
                clusters.add_tile(i, S, cluster[tile.set_start : tile.set_stop])
        return total, score, units, clusters, H

    parts = kernel._map(work, kernel.tiles)

    def joined(k):
        if parts[0][k] is None:
            return None
        out = parts[0][k]
        for p in parts[1:]:
            out = out + p[k]
        out.merge()
        return out

    units, clusters = joined(2), joined(3)
    n_units = units.n_units if units is not None else _n_runs(d.panel, d.n_sets)
    n_clusters = 0
    if cluster is not None:
        n_clusters = clusters.n_units if clusters is not None else _n_runs(cluster, d.n_sets)
    return LikelihoodSums(
        n_sets=d.n_sets, n_chosen=int(sum(p[0][2] for p in parts)), loglik=_scalar(sum(p[0][0] for p in parts)),
        loglik_null=float(sum(p[0][1] for p in parts)), score=sum(p[1] for p in parts) if want_score else None,
        opg=None if units is None else units.hh, n_units=n_units,
        opg_cluster=None if clusters is None else clusters.hh, n_clusters=n_clusters,
        hessian=sum(p[4] for p in parts) if exact_hessian else None, has_hessian=has_hessian,
        opg_with_score=not fused)
