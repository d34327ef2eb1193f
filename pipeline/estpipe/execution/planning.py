"""Partitioning: contiguous ranges of choice sets, balanced by rows (DESIGN.md, "Data flow").

A partition is a pure function of (file, range): any worker can rebuild it from the file alone,
which is what lets dask recompute a lost worker's partitions elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Sets start:stop of a file, owning rows row_start:row_stop."""

    index: int
    start: int
    stop: int
    row_start: int
    row_stop: int

    @property
    def n_sets(self) -> int:
        return self.stop - self.start

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


def default_partitions(workers: int) -> int:
    """One partition per worker (one in-process): one task per worker per evaluation. Measured on
    100,000 sets with 2 workers, two per worker added ~4 ms of dask overhead to every evaluation
    (twice the tasks, run one after the other on a one-thread worker) and no speed. A lost
    worker's partition is then rebuilt whole on one survivor; ask for more with --partitions
    when spreading that matters more (many workers, little memory to spare)."""
    return max(1, workers)


def plan_partitions(offsets: np.ndarray, n_partitions: int, cluster: np.ndarray | None = None) -> list[Partition]:
    """Split sets into at most `n_partitions` contiguous ranges of about equal rows.

    offsets: (n_sets + 1,) row offsets; cluster: (n_sets,) the ids of the independent units
    (clusters, or panel units; see `unit_ids`) with each unit's sets contiguous, or None. Cuts
    fall on set boundaries and, with units, on unit boundaries (a unit's sums must come from one
    partition). Fewer partitions come back when there are fewer cut points than asked for (e.g.
    7 partitions of 3 clusters gives 3).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_sets = len(offsets) - 1
    if n_partitions < 1:
        raise ValueError(f"n_partitions must be >= 1, got {n_partitions}")
    if n_sets == 0:
        return []
    if cluster is not None:
        cluster = np.asarray(cluster)
        # candidate cuts: the first set of every cluster after the first, plus the end
        candidates = np.flatnonzero(cluster[1:] != cluster[:-1]) + 1
    else:
        candidates = np.arange(1, n_sets)
    candidate_rows = offsets[candidates]
    n_rows = int(offsets[-1])
    cuts = [0]
    for k in range(1, n_partitions):
        if candidates.size == 0:
            break
        target = k * n_rows / n_partitions
        j = int(np.searchsorted(candidate_rows, target))
        # the nearer of the two candidates around the target row
        if j == candidates.size or (j > 0 and target - candidate_rows[j - 1] <= candidate_rows[j] - target):
            j -= 1
        cut = int(candidates[j])
        if cut > cuts[-1]:
            cuts.append(cut)
    cuts.append(n_sets)
    return [
        Partition(index=i, start=a, stop=b, row_start=int(offsets[a]), row_stop=int(offsets[b]))
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
        if b > a
    ]


def unit_ids(problem) -> np.ndarray | None:
    """The coarsest independent units of a file, (n_sets,) or None (sets): its clusters, else its
    panel units (units nest in clusters, so cuts between clusters are cuts between units too)."""
    return problem.cluster if problem.cluster is not None else getattr(problem, "panel", None)
