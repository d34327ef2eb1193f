"""The sums S needs, from per-set contributions h_i, one tile at a time, on any thread.

Units are sets, or clusters (runs of sets with the same id; DESIGN.md). A cluster may span tiles
(never partitions). Each tile closes the units that lie inside it and hands on, as open parts,
the first and the last unit it touches; `UnitSums.merge` joins the open parts of all tiles in tile
order, so tiles can be summed on several threads and still give the serial sums exactly. Nothing
of size (n_sets, M) is ever held beyond one tile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OpenUnit:
    """Part of a unit that may continue in a neighbouring tile: its id, sum of h (M,), set count."""

    id: object
    h: np.ndarray
    n: int


@dataclass
class UnitSums:
    """hh = sum_u h_u h_u' (M, M), nh = sum_u n_u h_u (M,), nn = sum_u n_u^2, n_units, over the
    closed units; plus, per tile (by index), the open parts at its two ends.

    The h are R h when a moment scale R is given (exact for powers of two), so that moments in
    huge units (|dm| ~ 1e150) do not overflow their squares."""

    hh: np.ndarray
    nh: np.ndarray
    nn: float = 0.0
    n_units: int = 0
    ends: list[tuple[int, OpenUnit, OpenUnit | None]] = field(default_factory=list)

    @classmethod
    def empty(cls, M: int, dtype=np.float64) -> "UnitSums":
        return cls(hh=np.zeros((M, M), dtype=dtype), nh=np.zeros(M, dtype=dtype))

    def add_tile(self, index: int, H: np.ndarray, ids: np.ndarray | None, scale: np.ndarray | None = None) -> None:
        """Tile `index`: H (n_sets_tile, M) per-set h_i; ids (n_sets_tile,) cluster ids, or None
        (sets are units: all close here)."""
        if scale is not None:
            H = H * scale
        if ids is None:
            self._close(H, np.ones(len(H)))
            return
        bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        hu = np.add.reduceat(H, bounds, axis=0)
        nu = np.diff(np.r_[bounds, len(H)])
        first = OpenUnit(ids[0], hu[0].copy(), int(nu[0]))
        last = OpenUnit(ids[bounds[-1]], hu[-1].copy(), int(nu[-1])) if len(bounds) > 1 else None
        self._close(hu[1:-1], nu[1:-1].astype(float))
        self.ends.append((index, first, last))

    def __add__(self, other: "UnitSums") -> "UnitSums":
        return UnitSums(hh=self.hh + other.hh, nh=self.nh + other.nh, nn=self.nn + other.nn,
                        n_units=self.n_units + other.n_units, ends=self.ends + other.ends)

    def merge(self) -> "UnitSums":
        """Join the tiles' open parts in tile order and close them: the partition's unit sums."""
        carry: OpenUnit | None = None
        for _, first, last in sorted(self.ends, key=lambda e: e[0]):
            if carry is not None and carry.id == first.id:
                first = OpenUnit(first.id, carry.h + first.h, carry.n + first.n)
            elif carry is not None:
                self._close_one(carry)
            if last is None:
                carry = first
            else:
                self._close_one(first)
                carry = last
        if carry is not None:
            self._close_one(carry)
        self.ends = []
        return self

    def _close_one(self, unit: OpenUnit) -> None:
        self._close(unit.h[None, :], np.array([float(unit.n)]))

    def _close(self, hu: np.ndarray, nu: np.ndarray) -> None:
        if len(hu) == 0:
            return
        self.hh += hu.T @ hu
        self.nh += nu @ hu
        self.nn += float(nu @ nu)
        self.n_units += len(hu)
