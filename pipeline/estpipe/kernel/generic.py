"""The generic strategy: any model, derivatives from the dual-block rules alone.

Per tile and per chunk of partials: seed the parameters, let the model build its utilities (or
its probabilities), and project onto dm with ONE GEMM: dm' [s | ds/db]. For a model whose
probabilities are the softmax of its utilities, the projection takes the utilities' partials
directly (dual.project_softmax: dm' ds = dm' (s du) - sum_i h_i ubar_i'), so the softmax's
partials are never formed. It has no reverse
rule: its pullback is the forward projection of v'h (the same partials against w = dm v, a GEMV
instead of the GEMM).
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Workspace, chunk_ranges, chunk_size, project, project_softmax, seed
from estpipe.kernel.request import Request
from estpipe.kernel.tiles import TileData
from estpipe.models.base import Model, call_model


class GenericDual:
    """The strategy for every model without a fused one. chunk: partials per dual block."""

    name = "generic-dual"
    reverse = False

    def __init__(self, model: Model, K: int, chunk: int | None = None):
        self.model = model
        P = model.n_params(K)
        self.chunks = chunk_ranges(P, chunk_size(P, chunk))

    def tile_sums(self, tile: TileData, dm, request: Request, ws: Workspace, acc, need_h: bool, chosen=None,
                  prescale: bool = False):
        chunks = self.chunks if request.jacobian else [(0, 0)]
        return generic_tile_sums(self.model, request.params, tile, dm, ws, acc, chunks, need_h, chosen,
                                 request.seed_scale)

    def tile_values(self, tile: TileData, dm, request: Request, ws: Workspace, acc, tape=None) -> None:
        generic_tile_sums(self.model, request.params, tile, dm, ws, acc, [(0, 0)], False)

    def tile_pullback(self, tile: TileData, dm, request: Request, v, ws: Workspace, acc, tape=None,
                      prescale: bool = False) -> None:
        generic_tile_pullback(self.model, request.params, tile, dm, v, ws, acc, self.chunks, request.seed_scale)


def softmax_of_utilities(model: Model) -> bool:
    """Whether the model's probabilities are the default softmax of its utilities: the projection
    then skips the softmax's partials (dual.project_softmax)."""
    return type(model).probabilities is Model.probabilities


def generic_tile_sums(model: Model, params, tile: TileData, dm, ws: Workspace, acc: np.ndarray,
                      chunks: list[tuple[int, int]], need_h: bool, chosen=None, seed_scale=None):
    """Add this tile's [sum_i h_i | sum_i dh_i/dbeta] to acc (M, 1 + P) (or (M, 1) with chunks
    [(0, 0)]); beta = seed_scale * params (seed_scale (P,), default ones).

    Returns (H, loglik): H (n_sets, M) per-set h_i when need_h (else None), loglik of the chosen rows."""
    seg = tile.seg
    H, loglik = None, 0.0
    by_utilities = softmax_of_utilities(model)
    for c, (k0, k1) in enumerate(chunks):
        ws.reset()
        theta = seed(params, ws, k0, k1, seed_scale)
        first = c == 0 and need_h
        if by_utilities:
            u = call_model(model, "utilities", theta, tile)
            block, h = project_softmax(dm, u, seg, want_h=first)
            if first:  # the next chunk reuses the workspace
                H = h.copy()
        else:
            s = call_model(model, "probabilities", theta, tile)
            block = project(dm, s)
            if first:
                scratch = None if seg.equal_size else ws.take((seg.n_rows, dm.shape[1]), s.a.dtype)
                H = seg.weighted_sum(s.value, dm, np.empty((seg.n_sets, dm.shape[1]), s.a.dtype), scratch)
        if c == 0:
            acc[:, 0] += block[:, 0]
            if chosen is not None:
                ws.reset()
                logs = call_model(model, "log_probabilities", seed(params, ws, 0, 0), tile)
                loglik = float(np.sum(logs.value[chosen[0]].real))
        acc[:, 1 + k0 : 1 + k1] += block[:, 1:]
    return H, loglik


def generic_tile_pullback(model: Model, params, tile: TileData, dm, v, ws: Workspace, acc: np.ndarray,
                          chunks: list[tuple[int, int]], seed_scale=None) -> None:
    """Add this tile's sum_i (dh_i/dbeta)' v to acc (P,): the forward partials of the scalar
    w' s with w = dm v, so the M-wide GEMM becomes a GEMV."""
    by_utilities = softmax_of_utilities(model)
    for k0, k1 in chunks:
        ws.reset()
        if by_utilities:
            # w outside the workspace: the pass then asks it for the buffers of the forward sums,
            # in their order (one (rows,) vector allocated per tile)
            w = np.dot(dm, v)
            theta = seed(params, ws, k0, k1, seed_scale)
            u = call_model(model, "utilities", theta, tile)
            acc[k0:k1] += project_softmax(w[:, None], u, tile.seg)[0][0, 1:]
            continue
        w = np.dot(dm, v, out=ws.take((tile.seg.n_rows,)))
        theta = seed(params, ws, k0, k1, seed_scale)
        s = call_model(model, "probabilities", theta, tile)
        acc[k0:k1] += np.dot(w, s.partials)
