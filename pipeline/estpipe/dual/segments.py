"""Choice sets of one tile as CSR segments: reductions over sets and broadcasts back to rows.

A tile holds whole sets; set i of the tile owns rows offsets[i]:offsets[i+1] of the tile. When
every set has the same size J (the seed design, and many real data sets), rows reshape to
(n_sets, J, ...) and per-set reductions become stacked products, which are much faster than
`np.add.reduceat` or sums over a middle axis.
"""

from __future__ import annotations

import numpy as np


class Segments:
    """The sets of one tile. offsets: (n_sets + 1,) local row offsets, offsets[0] = 0."""

    def __init__(self, offsets: np.ndarray):
        offsets = np.asarray(offsets, dtype=np.int64)
        self.offsets = offsets
        self.starts = offsets[:-1]
        self.sizes = np.diff(offsets)
        self.n_sets = len(self.sizes)
        self.n_rows = int(offsets[-1])
        first = int(self.sizes[0]) if self.n_sets else 0
        # J when all sets have the same size (the reshape fast path), else None.
        self.equal_size = first if self.n_sets and bool(np.all(self.sizes == first)) else None
        self.row_set = None if self.equal_size else np.repeat(np.arange(self.n_sets), self.sizes)
        self._ones = np.ones((1, self.equal_size or 1))

    # -- reductions over the rows of each set ------------------------------------------------
    def sum(self, A: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Per-set sums of A (rows, C) into out (n_sets, C)."""
        if self.equal_size:
            J = self.equal_size
            # ones (1, J) @ A_i (J, C) for every set: a stacked product, no middle-axis reduction.
            np.matmul(self._ones.astype(A.dtype, copy=False), A.reshape(self.n_sets, J, -1), out=out[:, None, :])
        else:
            np.add.reduceat(A, self.starts, axis=0, out=out)
        return out

    def weighted_sum(self, w: np.ndarray, A: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
        """Per-set sums of w_r A_r: w (rows,), A (rows, C), out (n_sets, C); scratch (rows, C) for unequal sets."""
        if self.equal_size:
            J = self.equal_size
            np.matmul(w.reshape(self.n_sets, 1, J), A.reshape(self.n_sets, J, -1), out=out[:, None, :])
        else:
            np.multiply(A, w[:, None], out=scratch)
            np.add.reduceat(scratch, self.starts, axis=0, out=out)
        return out

    def sum1(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Per-set sums of a vector a (rows,) into out (n_sets,)."""
        if self.equal_size:
            return np.sum(a.reshape(self.n_sets, self.equal_size), axis=1, out=out)
        return np.add.reduceat(a, self.starts, out=out)

    def max1(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Per-set maxima of a real vector a (rows,) into out (n_sets,)."""
        if self.equal_size:
            return np.max(a.reshape(self.n_sets, self.equal_size), axis=1, out=out)
        return np.maximum.reduceat(a, self.starts, out=out)

    def argmax1(self, a: np.ndarray) -> np.ndarray:
        """Row index (within the tile) of the first maximum of a real vector a (rows,) in each set."""
        if self.equal_size:
            J = self.equal_size
            return np.argmax(a.reshape(self.n_sets, J), axis=1) + self.starts
        m = np.maximum.reduceat(a, self.starts)
        hits = np.flatnonzero(a == m[self.row_set])
        _, first = np.unique(self.row_set[hits], return_index=True)
        return hits[first]

    # -- broadcasts of per-set values back to rows --------------------------------------------
    def broadcast(self, v: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows' copies of per-set values v (n_sets, ...) into out (rows, ...)."""
        if self.equal_size:
            out.reshape(self.n_sets, self.equal_size, *v.shape[1:])[...] = v[:, None]
            return out
        if out.dtype != v.dtype:  # a real shift into a complex buffer (complex step)
            out[...] = v[self.row_set]
            return out
        return np.take(v, self.row_set, axis=0, out=out)
