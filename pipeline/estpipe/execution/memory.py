"""How much memory resident partitions need, and refusing before loading when it will not fit.

The estimate is deliberately simple: the partition's arrays (X, dm, offsets, chosen, cluster)
plus the kernel's work buffers (tiles of whole sets, so they do not grow with the data) plus the
fixed cost of a Python process with numpy, h5py and (on a cluster) a dask worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from estpipe.errors import UserError
from estpipe.execution.partitions import Partition

# Work buffers of one kernel: a few (tile_rows, 1 + K + M) float64 tiles. 64 MiB covers tiles of
# up to ~60,000 rows at K + M = 60 with room to spare; it does not depend on the data size.
KERNEL_BUFFER_BYTES = 64 * 2**20
# RSS of an idle Python process with numpy/scipy/h5py imported, and of a dask worker process.
PROCESS_BYTES = 150 * 2**20


def partition_bytes(p: Partition, K: int, M: int, has_chosen: bool, has_cluster: bool) -> int:
    """Bytes of one partition's arrays once read: X (rows, K) and dm (rows, M) float64,
    offsets (sets + 1,) int64, chosen (rows,) int8, cluster (sets,) int64."""
    rows, sets = p.n_rows, p.n_sets
    return 8 * rows * (K + M) + 8 * (sets + 1) + (rows if has_chosen else 0) + (8 * sets if has_cluster else 0)


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
    """Bytes needed per worker (worker i holds the partitions assigned to it) and in total."""

    per_worker: list[int]
    data_bytes: int

    @property
    def total(self) -> int:
        return sum(self.per_worker)


def plan_memory(partitions: list[Partition], assignment: list[int], n_workers: int, K: int, M: int,
                has_chosen: bool, has_cluster: bool, new_processes: bool) -> MemoryPlan:
    """Per-worker need: its partitions' arrays + one kernel's buffers per partition (+ the
    process itself when we are about to start it)."""
    per_worker = [PROCESS_BYTES if new_processes else 0 for _ in range(n_workers)]
    data = 0
    for p, w in zip(partitions, assignment):
        b = partition_bytes(p, K, M, has_chosen, has_cluster)
        data += b
        per_worker[w] += b + KERNEL_BUFFER_BYTES
    return MemoryPlan(per_worker=per_worker, data_bytes=data)


def check_fits_machine(plan: MemoryPlan, available: int, where: str, advice: str) -> None:
    """Refuse (UserError) when all workers on this machine together need more than it has."""
    if plan.total > available:
        raise UserError(
            f"the data will not fit in memory: {where} needs about {gib(plan.total)} "
            f"({gib(plan.data_bytes)} of data plus buffers), but only {gib(available)} is available; {advice}"
        )


def check_fits_workers(plan: MemoryPlan, available: list[int], addresses: list[str]) -> None:
    """Refuse when any worker of an existing cluster would hold more than it can.

    available[i]: bytes worker i can still take (its memory limit less what it uses now)."""
    for need, have, addr in zip(plan.per_worker, available, addresses):
        if need > have:
            raise UserError(
                f"the data will not fit in memory: worker {addr} would need about {gib(need)} for its "
                f"partitions ({gib(plan.data_bytes)} of data in all), but has only {gib(have)} available; "
                "add workers or machines (or give each worker more memory)"
            )
