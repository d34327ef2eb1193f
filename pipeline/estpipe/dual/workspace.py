"""Work buffers allocated once and reused on every evaluation (ForwardDiff's config idea).

Fresh multi-megabyte arrays on every call cost page faults that can exceed the arithmetic.
A `Workspace` hands out buffers in the order they are asked for: an
evaluation asks for the same sequence of shapes every time (a model is a fixed program), so the
k-th request of a tile always gets the k-th buffer. `reset()` starts the sequence again for the
next tile. A buffer grows only when a larger request arrives (the first, largest tile), so after
the first evaluation nothing is allocated. Each kernel owns its own workspace: two kernels (two
partitions, two threads) never share one.
"""

from __future__ import annotations

import math

import numpy as np


class Workspace:
    def __init__(self):
        self._buffers: dict[np.dtype, list[np.ndarray]] = {}
        self._next: dict[np.dtype, int] = {}

    def reset(self) -> None:
        """Start handing out buffers from the first one again (call once per tile)."""
        for key in self._next:
            self._next[key] = 0

    def take(self, shape: tuple[int, ...], dtype=np.float64) -> np.ndarray:
        """A C-contiguous array of `shape`, uninitialised, valid until the next reset()."""
        dtype = np.dtype(dtype)
        buffers = self._buffers.setdefault(dtype, [])
        k = self._next.get(dtype, 0)
        size = math.prod(shape)
        if k == len(buffers):
            buffers.append(np.empty(size, dtype=dtype))
        elif buffers[k].size < size:
            buffers[k] = np.empty(size, dtype=dtype)
        self._next[dtype] = k + 1
        return buffers[k][:size].reshape(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers (the kernel's memory beyond its data)."""
        return sum(b.nbytes for bufs in self._buffers.values() for b in bufs)
