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

from dataclasses import dataclass

import numpy as np

from estpipe.dual import Workspace, seed
from estpipe.kernel.fused_mixed import simulated_likelihood_tile
from estpipe.kernel.tiles import TileData
from estpipe.kernel.units import UnitSums
from estpipe.models.base import Model, call_model


@dataclass(eq=False)
class LikelihoodSums:
    """Sums over the choice sets of one partition (or of many, once added); P parameters.

    n_sets: sets; n_chosen: chosen rows; loglik: sum of log s over the chosen rows; loglik_null:
    the same with equal probabilities (sum of -log J_i over the chosen rows' sets); score: (P,)
    sum of the scores; opg: (P, P) sum over units u of s_u s_u' (s_u: the unit's score sum);
    n_units: units; opg_cluster: (P, P) the same over the file's clusters, or None when the
    request did not use them; n_clusters: clusters (0 without). Partials are with respect to
    beta = seed_scale * params when the request had a seed scale."""

    n_sets: int
    n_chosen: int
    loglik: float
    loglik_null: float
    score: np.ndarray
    opg: np.ndarray
    n_units: int
    opg_cluster: np.ndarray | None = None
    n_clusters: int = 0

    def __add__(self, other: "LikelihoodSums") -> "LikelihoodSums":
        if isinstance(other, int) and other == 0:  # lets sum() start from 0
            return self
        both = self.opg_cluster is not None and other.opg_cluster is not None
        return LikelihoodSums(
            n_sets=self.n_sets + other.n_sets, n_chosen=self.n_chosen + other.n_chosen,
            loglik=self.loglik + other.loglik, loglik_null=self.loglik_null + other.loglik_null,
            score=self.score + other.score, opg=self.opg + other.opg, n_units=self.n_units + other.n_units,
            opg_cluster=self.opg_cluster + other.opg_cluster if both else None,
            n_clusters=self.n_clusters + other.n_clusters)

    __radd__ = __add__

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.score, self.opg, self.opg_cluster) if a is not None) + 48


def likelihood_tile(model: Model, params, tile: TileData, ws: Workspace, chosen, seed_scale=None):
    """This tile's (loglik, loglik_null, n_chosen, S) with S (n_sets_tile, P) the per-set score
    sums; chosen: (rows, sets) the tile's chosen rows and the tile-local set of each."""
    rows, sets = chosen
    P = len(params)
    ws.reset()
    theta = seed(params, ws, 0, P, seed_scale)
    logs = call_model(model, "log_probabilities", theta, tile)
    a = np.asarray(logs.a)[rows]  # (n_chosen, 1 + P)
    S = np.zeros((tile.seg.n_sets, P), dtype=a.dtype)
    np.add.at(S, sets, a[:, 1:])
    null = -float(np.sum(np.log(tile.seg.sizes[sets])))
    ll = np.sum(a[:, 0])
    return (ll if np.iscomplexobj(ll) else float(ll)), null, len(rows), S


def _scalar(x):
    return x if np.iscomplexobj(x) else float(x)


def likelihood_sums(kernel, request) -> LikelihoodSums:
    """The partition's LikelihoodSums at request.params for kernel (engine.PartitionKernel), on
    its tile threads. Units: the panel units, else the sets; clusters when the request is
    clustered and the data have them."""
    d = kernel.data
    if d.chosen is None:
        raise ValueError("a likelihood needs the chosen rows; these data have none")
    P = kernel.n_params
    dtype = np.complex128 if request.complex_step else np.float64
    cluster = d.cluster if (request.clustered and d.cluster is not None) else None
    index = kernel._tile_index
    simulated = getattr(kernel.model, "simulated", False)

    def work(ws, tiles):
        total = [0.0, 0.0, 0]
        score = np.zeros(P, dtype=dtype)
        units = UnitSums.empty(P, dtype)
        clusters = UnitSums.empty(P, dtype) if cluster is not None else None
        for tile in tiles:
            i = index[tile.set_start]
            if simulated:
                ll, null, n, S = simulated_likelihood_tile(kernel.model, kernel.view(tile), request.params,
                                                           kernel._chosen[i])
                if request.seed_scale is not None:
                    S = S / request.seed_scale
            else:
                ll, null, n, S = likelihood_tile(kernel.model, request.params, kernel.view(tile), ws,
                                                 kernel._chosen[i], request.seed_scale)
            total[0] += ll
            total[1] += null
            total[2] += n
            score += S.sum(axis=0)
            units.add_tile(i, S, None if d.panel is None else d.panel[tile.set_start : tile.set_stop])
            if clusters is not None:
                clusters.add_tile(i, S, cluster[tile.set_start : tile.set_stop])
        return total, score, units, clusters

    parts = kernel._map(work, kernel.tiles)
    units = parts[0][2]
    for p in parts[1:]:
        units = units + p[2]
    units.merge()
    clusters = None
    if cluster is not None:
        clusters = parts[0][3]
        for p in parts[1:]:
            clusters = clusters + p[3]
        clusters.merge()
    return LikelihoodSums(
        n_sets=d.n_sets, n_chosen=int(sum(p[0][2] for p in parts)), loglik=_scalar(sum(p[0][0] for p in parts)),
        loglik_null=float(sum(p[0][1] for p in parts)), score=sum(p[1] for p in parts), opg=units.hh,
        n_units=units.n_units, opg_cluster=None if clusters is None else clusters.hh,
        n_clusters=0 if clusters is None else clusters.n_units)
