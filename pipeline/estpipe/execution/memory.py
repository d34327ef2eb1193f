"""How much memory resident partitions need, and refusing before loading when it will not fit.

A partition costs its arrays (X, dm, offsets, chosen, cluster), its kernel's indexes (the sets of
every tile; the adjoint's residual) and the kernel's work buffers: one workspace per thread it
uses, each the size of its largest tile, so min(rows, tile rows) rows of buffers, which do not
grow with the data beyond one tile. The buffers' size is measured on the kernel itself (see
`kernel_buffer_bytes`). A process we are about to start adds the fixed cost of a Python process
with numpy, h5py and a dask worker.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import psutil

from estpipe.errors import UserError
from estpipe.execution.planning import Partition

# RSS of an idle Python process with numpy/scipy/h5py imported, and of a dask worker process.
PROCESS_BYTES = 150 * 2**20
# Tile rows of the two measurements of kernel_buffer_bytes (small, so that measuring is cheap).
_PROBE_TILE_ROWS = (16, 32)


def partition_bytes(p: Partition, K: int, M: int, has_chosen: bool, has_cluster: bool) -> int:
    """Bytes of one partition's arrays once read: X (rows, K) and dm (rows, M) float64,
    offsets (sets + 1,) int64, chosen (rows,) int8, cluster (sets,) int64."""
    rows, sets = p.n_rows, p.n_sets
    return 8 * rows * (K + M) + 8 * (sets + 1) + (rows if has_chosen else 0) + (8 * sets if has_cluster else 0)


@functools.lru_cache(maxsize=32)
def _workspace_line(K: int, M: int, model: str, derivatives: str) -> tuple[float, float]:
    """One thread's kernel workspace as (fixed bytes, bytes per tile row), measured.

    A kernel's buffers are a few vectors and (rows, columns) blocks per tile row, per set and
    fixed (M x K products), so they are linear in the tile rows t when sets are 2 rows (the most
    sets a tile can hold: single-alternative sets are never stored). Two kernels on synthetic
    data with tiles of 16 and 32 rows, sets of 2 rows but the first of 3 (so both the equal-size
    and the general code paths size their buffers), run every kind of evaluation an estimation
    makes; the line through their workspace sizes extrapolates to any t."""
    from estpipe.data.format import ChoiceData
    from estpipe.kernel import PartitionKernel

    measured = []
    rng = np.random.default_rng(0)
    for t in _PROBE_TILE_ROWS:
        sizes = np.full(9 * t // 2, 2)
        sizes[0] = 3
        offsets = np.r_[0, np.cumsum(sizes)]
        rows = int(offsets[-1])
        chosen = np.zeros(rows, dtype=np.int8)
        chosen[offsets[:-1]] = 1
        data = ChoiceData(X=0.1 * rng.standard_normal((rows, K)), dm=rng.standard_normal((rows, M)), offsets=offsets,
                          chosen=chosen, cluster=np.arange(len(sizes)) // 3)
        kernel = PartitionKernel(data, model=model, derivatives=derivatives, tile_rows=t, threads=1)
        b = np.zeros(kernel.n_params)
        with np.errstate(all="ignore"):
            kernel.sums(b, jacobian=True, covariance=True)
            kernel.sums(b, jacobian=True)
            kernel.sums(b, jacobian=False)
            kernel.pullback(b, np.ones(M))
        measured.append(kernel.buffer_nbytes)
    (t0, t1), (b0, b1) = _PROBE_TILE_ROWS, measured
    per_row = max(0.0, (b1 - b0) / (t1 - t0))
    return max(0.0, b0 - per_row * t0), per_row


def kernel_buffer_bytes(rows: int, K: int, M: int, model: str = "logit", derivatives: str = "dual",
                        threads: int = 1) -> int:
    """Work buffers of the kernel of one partition of `rows` rows: one workspace per thread it
    uses (at most one per tile), each for a tile of min(rows, tile rows) rows, plus the
    per-call sums (M x (1 + P) per thread) and the moment covariance (M x M)."""
    from estpipe.kernel.tiles import DEFAULT_TILE_ROWS

    if rows <= 0:
        return 0
    fixed, per_row = _workspace_line(K, M, model, derivatives)
    t = min(rows, DEFAULT_TILE_ROWS)
    used = max(1, min(threads, -(-rows // DEFAULT_TILE_ROWS)))
    sums = 8 * M * (1 + K) * (used + 1) + 2 * 8 * M * M
    return int(used * (fixed + per_row * t)) + sums


def kernel_index_bytes(p: Partition, model: str = "logit", derivatives: str = "dual") -> int:
    """The kernel's indexes of one partition, which grow with it: every tile's and stripe's set
    offsets, starts, sizes and row-to-set map, the chosen rows per tile, and for the adjoint the
    probabilities it keeps (8 bytes per row)."""
    residual = 8 * p.n_rows if (model == "logit" and derivatives == "adjoint") else 0
    return 16 * p.n_rows + 48 * p.n_sets + residual


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def available_memory() -> int:
    """Bytes this machine can still give: psutil's available memory, capped by a cgroup v2 limit
    (Slurm and containers set one) when there is one."""
    avail = psutil.virtual_memory().available
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


@dataclass
class MemoryPlan:
    """Bytes needed per worker (worker i holds the partitions assigned to it) and in total, and
    the bytes of data (the partitions' arrays) among them, per worker and in total."""

    per_worker: list[int]
    data_bytes: int
    data_per_worker: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_worker)


def plan_memory(partitions: list[Partition], assignment: list[int], n_workers: int, K: int, M: int,
                has_chosen: bool, has_cluster: bool, new_processes: bool, *, model: str = "logit",
                derivatives: str = "dual", threads: int = 1) -> MemoryPlan:
    """Per-worker need: its partitions' arrays, each partition's kernel indexes and its work
    buffers for min(its rows, the tile rows) with `threads` threads (the kernel's), plus the
    process itself when we are about to start it."""
    per_worker = [PROCESS_BYTES if new_processes else 0 for _ in range(n_workers)]
    data = [0] * n_workers
    for p, w in zip(partitions, assignment):
        b = partition_bytes(p, K, M, has_chosen, has_cluster)
        data[w] += b
        per_worker[w] += (b + kernel_index_bytes(p, model, derivatives)
                          + kernel_buffer_bytes(p.n_rows, K, M, model, derivatives, threads))
    return MemoryPlan(per_worker=per_worker, data_bytes=sum(data), data_per_worker=data)


@dataclass(frozen=True)
class MemoryPool:
    """Memory that some workers draw on: `available` bytes for the workers numbered `workers`
    (one pool per worker of a cluster; one for all the processes of this machine). `name` says
    who needs it in a message ("this process", "worker tcp://..."), `advice` how to get more."""

    name: str
    available: int
    workers: tuple[int, ...]
    advice: str


def check_memory(problem, partitions: list[Partition], assignment: list[int], pools: list[MemoryPool], *,
                 model: str, derivatives: str, threads: int, new_processes: bool, moments: bool = True) -> MemoryPlan:
    """The memory check, before any partition is loaded: refuse (UserError) when the workers of
    a pool would need more than it has. problem: the ChoiceProblem (sizes, chosen, cluster);
    assignment[i]: the worker of partition i; threads: the kernel threads of each worker;
    new_processes: the workers are processes this run is about to start (each charged
    PROCESS_BYTES); moments: the partitions hold dm (False for maximum likelihood, which loads
    none: then dm counts nothing)."""
    n_workers = max((w for pool in pools for w in pool.workers), default=-1) + 1
    plan = plan_memory(partitions, assignment, n_workers, problem.K, problem.M if moments else 0, problem.has_chosen,
                       problem.has_cluster,
                       new_processes, model=model, derivatives=derivatives, threads=threads)
    for pool in pools:
        need = sum(plan.per_worker[w] for w in pool.workers)
        if need > pool.available:
            data = sum(plan.data_per_worker[w] for w in pool.workers)
            raise UserError(
                f"the data will not fit in memory: {pool.name} needs about {gib(need)} ({gib(data)} of data plus "
                f"buffers), but only {gib(pool.available)} is available; {pool.advice}"
            )
    return plan
