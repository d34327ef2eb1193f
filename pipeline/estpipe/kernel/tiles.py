"""Tiles: runs of whole choice sets of about `tile_rows` rows, processed one at a time.

Per-tile buffers are (tile_rows, 1 + P), so memory beyond the data does not grow with the data,
and a tile's X and dm stay in cache between its few operations and its GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estpipe.dual import Segments

# Measured with `estpipe bench` (K = 20, M = 40): 16,384-row tiles were fastest at 1,000 x 30
# sets (fewer numpy calls per evaluation) and no slower than 4,096 or 8,192 at 20,000 x 30; the
# buffers stay near 5 MB per thread.
DEFAULT_TILE_ROWS = 16384


@dataclass
class TileData:
    """What a model sees of one tile (models/base.py).

    X: (rows, K) covariates; seg: the tile's sets; alt: (rows,) alternative codes or None;
    unit: (n_sets,) the global index of each set's panel unit (or of the set itself when the file
    has no panel units: each set is its own decision maker); x_names: the columns of X."""

    X: np.ndarray
    seg: Segments
    alt: np.ndarray | None
    unit: np.ndarray
    x_names: tuple[str, ...] = ()

    def x(self, name: str) -> np.ndarray:
        """The column of X called `name` (rows,)."""
        return self.X[:, self.x_names.index(name)]


@dataclass
class Tile:
    """Sets [set_start, set_stop) owning rows [row_start, row_stop); seg: their local offsets."""

    set_start: int
    set_stop: int
    row_start: int
    row_stop: int
    seg: Segments

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_stop)


def plan_tiles(offsets: np.ndarray, tile_rows: int | None = None, units: np.ndarray | None = None) -> list[Tile]:
    """Split sets (offsets: (n_sets + 1,)) into tiles of at most tile_rows rows; a set larger
    than tile_rows gets a tile of its own. units: (n_sets,) panel-unit ids (each unit's sets
    contiguous) or None: tiles then cut only between units, and a unit larger than tile_rows gets
    a tile of its own."""
    tile_rows = DEFAULT_TILE_ROWS if tile_rows is None else int(tile_rows)
    if tile_rows < 1:
        raise ValueError("tile_rows must be at least 1")
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    if units is None:
        cuts = np.arange(n + 1)
    else:
        units = np.asarray(units)
        cuts = np.r_[0, np.flatnonzero(units[1:] != units[:-1]) + 1, n] if n else np.zeros(1, dtype=np.int64)
    cut_rows = offsets[cuts]
    tiles, c = [], 0
    while c < len(cuts) - 1:
        i = int(cuts[c])
        d = int(np.searchsorted(cut_rows, offsets[i] + tile_rows, side="right")) - 1
        d = min(max(d, c + 1), len(cuts) - 1)
        j = int(cuts[d])
        r0, r1 = int(offsets[i]), int(offsets[j])
        tiles.append(Tile(i, j, r0, r1, Segments(offsets[i : j + 1] - r0)))
        c = d
    return tiles
