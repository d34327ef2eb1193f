"""The sums S needs, from per-set contributions h_i, one tile at a time.

Units are sets, or clusters (runs of sets with the same id; DESIGN.md). A cluster may span
tiles (never partitions), so the last unit of a tile stays open until a later tile starts a new
id or the partition ends. Nothing of size (n_sets, M) is ever held beyond one tile.
"""

from __future__ import annotations

import numpy as np


class UnitSums:
    """Accumulates hh = sum_u h_u h_u' (M, M), nh = sum_u n_u h_u (M,), nn = sum_u n_u^2, n_units.

    scale: (M,) moment scale R or None; the sums are then of R h_u (exact when R holds powers of
    two), so that moments in huge units (|dm| ~ 1e150) do not overflow their squares."""

    def __init__(self, M: int, scale: np.ndarray | None = None):
        self.scale = scale
        self.hh = np.zeros((M, M))
        self.nh = np.zeros(M)
        self.nn = 0.0
        self.n_units = 0
        self._open_h = np.zeros(M)
        self._open_n = 0
        self._open_id = None

    def add_sets(self, H: np.ndarray, cluster: np.ndarray | None) -> None:
        """H: (n_sets_tile, M) per-set h_i; cluster: (n_sets_tile,) ids, or None (sets are units)."""
        if self.scale is not None:
            H = H * self.scale
        if cluster is None:
            self._close(H, np.ones(len(H)))
            return
        bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
        hu = np.add.reduceat(H, bounds, axis=0)
        nu = np.diff(np.r_[bounds, len(H)])
        ids = cluster[bounds]
        if self._open_id is not None and ids[0] == self._open_id:
            hu[0] += self._open_h
            nu[0] += self._open_n
        elif self._open_id is not None:
            self._close(self._open_h[None, :], np.array([self._open_n]))
        self._close(hu[:-1], nu[:-1].astype(float))
        self._open_h, self._open_n, self._open_id = hu[-1].copy(), int(nu[-1]), ids[-1]

    def finish(self) -> None:
        if self._open_id is not None:
            self._close(self._open_h[None, :], np.array([float(self._open_n)]))
            self._open_id = None

    def _close(self, hu: np.ndarray, nu: np.ndarray) -> None:
        if len(hu) == 0:
            return
        self.hh += hu.T @ hu
        self.nh += nu @ hu
        self.nn += float(nu @ nu)
        self.n_units += len(hu)
