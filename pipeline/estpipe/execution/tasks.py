"""The tasks a back end runs next to the data: load a partition once, then evaluate it.

These functions are the same in-process and on dask workers, so both back ends run one code
path. A `ResidentPartition` stays where it was loaded; an evaluation returns a `TaskResult` whose
payload is the partition's additive sums (MomentSums, a few M x (1 + K) blocks) or a (P,) vector,
never rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from estpipe.data.format import ChoiceDataFile
from estpipe.kernel import MomentSums, PartitionKernel


@dataclass(eq=False)
class ResidentPartition:
    """One partition's kernel (which holds its data) and where it came from."""

    path: str
    start: int
    stop: int
    kernel: PartitionKernel
    nbytes: int

    def __sizeof__(self) -> int:
        # dask's scheduler weighs moving a task's inputs by their size; reporting the real size
        # keeps evaluations on the worker that holds the data (the default, sys.getsizeof of the
        # wrapper, would be ~50 bytes and make moving it look free).
        return self.nbytes


@dataclass(eq=False)
class TaskResult:
    """What leaves a worker per evaluation: the payload, the kernel's own time in seconds, and the
    pid of the process that ran it (to find the critical path when a worker runs several)."""

    value: MomentSums | np.ndarray
    seconds: float
    pid: int = 0

    def __sizeof__(self) -> int:
        v = self.value
        return 64 + (v.nbytes if isinstance(v, (MomentSums, np.ndarray)) else 0)


def load_partition(path: str, start: int, stop: int, model: str, derivatives: str) -> ResidentPartition:
    """Read sets start:stop of the file at `path` (once) and build their kernel."""
    with ChoiceDataFile(path) as f:
        data = f.read_sets(start, stop)
    kernel = PartitionKernel(data, model=model, derivatives=derivatives)
    return ResidentPartition(path=str(Path(path)), start=start, stop=stop, kernel=kernel, nbytes=int(data.nbytes))


def partition_sums(part: ResidentPartition, params: np.ndarray, jacobian: bool, covariance: bool,
                   clustered: bool) -> TaskResult:
    t0 = time.perf_counter()
    sums = part.kernel.sums(params, jacobian=jacobian, covariance=covariance, clustered=clustered)
    return TaskResult(sums, time.perf_counter() - t0, os.getpid())


def partition_pullback(part: ResidentPartition, params: np.ndarray, v: np.ndarray) -> TaskResult:
    t0 = time.perf_counter()
    out = np.asarray(part.kernel.pullback(params, v), dtype=np.float64)
    return TaskResult(out, time.perf_counter() - t0, os.getpid())


def blas_report() -> dict:
    """The BLAS libraries of this process and their thread counts (threadpoolctl), plus the pid."""
    from threadpoolctl import threadpool_info

    libs = [
        {"library": i.get("internal_api"), "version": i.get("version"), "threads": i.get("num_threads")}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    return {"pid": os.getpid(), "blas": libs}
