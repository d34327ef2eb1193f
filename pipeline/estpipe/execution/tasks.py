"""The tasks a back end runs next to the data: load a partition once, then evaluate it.

These functions are the same in-process and on dask workers, so both back ends run one code
path. A `ResidentPartition` stays where it was loaded; an evaluation returns a `TaskResult` whose
payload is the partition's additive sums (MomentSums, a few M x (1 + K) blocks) or a (P,) vector,
never rows.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from estpipe.data.format import MAX_ABS_VALUE, ChoiceDataFile
from estpipe.errors import UserError
from estpipe.kernel.request import Request
from estpipe.models.spec import ModelSpec
from estpipe.kernel import MomentSums, PartitionKernel
from estpipe.kernel.blas import blas_libraries
from estpipe.kernel.likelihood import LikelihoodSums


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

    value: MomentSums | LikelihoodSums | np.ndarray
    seconds: float
    pid: int = 0

    def __sizeof__(self) -> int:
        v = self.value
        return 64 + (v.nbytes if isinstance(v, (MomentSums, LikelihoodSums, np.ndarray)) else 0)


# Below this, np.empty: the saving is in the many page faults of a large array.
POPULATE_MIN_BYTES = 64 * 2**20


def populated_empty(shape, dtype=np.float64) -> np.ndarray:
    """An uninitialised array whose pages are already resident: anonymous memory mapped with
    MAP_POPULATE, so the kernel backs it in one system call.

    Faulting 1.44 GB in page by page while h5py copies into it took 1.7-4.8 s on the target VMs
    (each first touch of a page is a hypervisor fault) against 0.5-0.9 s populated (measured
    interleaved). Falls back to np.empty where MAP_POPULATE does not exist (not Linux) and for
    small arrays. The mapping is released with the last reference to the array."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    flag = getattr(mmap, "MAP_POPULATE", None)
    if flag is None or nbytes < POPULATE_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
    except OSError:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def check_values(path, dataset: str, values: np.ndarray, columns: list[str], row0: int, offsets: np.ndarray,
                 set0: int) -> None:
    """Refuse NaN, infinite and |value| > MAX_ABS_VALUE in `values` (rows, C), the rows row0: of
    `dataset` in the file, with the column, the row and the set; `offsets` (sets + 1,) of these
    rows, whose first set is set0.

    One BLAS dot product of the array with itself: NaN and inf carry into it, and a sum of squares
    at most MAX_ABS_VALUE^2 means no value is larger (one pass, threaded; on 3,000,000 x 60 it cost
    about a tenth of reading the rows). Only a larger sum, or a bad value, takes the exact look."""
    flat = values.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        squares = float(flat @ flat) if flat.size else 0.0
    if squares <= MAX_ABS_VALUE**2:
        return
    bad = ~(np.abs(flat) <= MAX_ABS_VALUE)  # NaN compares False
    if not bad.any():
        return  # many large values, none too large
    i, j = divmod(int(np.argmax(bad)), values.shape[1])
    value = float(values[i, j])
    where = (f"{path}: dataset {dataset}, column {columns[j]}, row {row0 + i} (0-based, in set "
             f"{set0 + int(np.searchsorted(offsets, i, side='right')) - 1})")
    if not np.isfinite(value):
        text = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
        raise UserError(f"{where} is {text}; every value of {dataset} must be a finite number: fix that row where "
                        "the data come from and write the file again (estpipe load refuses NaN and inf)")
    raise UserError(f"{where} is {value:g}, beyond +-{MAX_ABS_VALUE:g} (its square overflows float64); rescale "
                    f"column {columns[j]} (e.g. to thousands) and write the file again")


@dataclass(frozen=True)
class PartitionSource:
    """What every resident partition of a run is built from: the file (its absolute path and
    fingerprint) and everything that changes a kernel (model, derivatives). Whatever is added
    to a kernel's recipe is added here, so that `key` names it too."""

    path: str
    fingerprint: str
    model: ModelSpec
    derivatives: str
    moments: bool = True  # False: dm is not read (maximum likelihood needs X and the chosen rows only)

    @classmethod
    def of(cls, problem, model: ModelSpec | str, derivatives: str, moments: bool = True) -> "PartitionSource":
        """The source of a ChoiceProblem's partitions (estpipe.data.problem); model: a ModelSpec
        (or a registered model's name)."""
        spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
        return cls(str(problem.path), problem.fingerprint, spec, derivatives, moments)

    def key(self, start: int, stop: int) -> str:
        """The dask key of sets start:stop loaded from this source. Equal keys are the same
        partition (a task of that key already on the cluster is reused), so the key holds every
        field."""
        return f"estpipe-partition-{self.fingerprint}-{start}-{stop}-{self.model.name}-{self.model.key()}-{self.derivatives}" + ("" if self.moments else "-nodm")


def load_partition(source: PartitionSource, start: int, stop: int) -> ResidentPartition:
    """Read sets start:stop of the source's file (once), check their values and build their kernel."""
    path = source.path
    with ChoiceDataFile(path) as f:
        data = f.read_sets(start, stop, empty=populated_empty, with_dm=source.moments)
        row0, x_names, moment_names = int(f.offsets[start]), f.param_names, f.moment_names
        model = source.model.build(f)
    check_values(path, "X", data.X, x_names, row0, data.offsets, start)
    if source.moments:
        check_values(path, "dm", data.dm, moment_names, row0, data.offsets, start)
    kernel = PartitionKernel(data, model=model, derivatives=source.derivatives, x_names=x_names)
    return ResidentPartition(path=str(Path(path)), start=start, stop=stop, kernel=kernel, nbytes=int(data.nbytes))


def partition_sums(part: ResidentPartition, request: Request) -> TaskResult:
    """The partition's additive sums for `request` (kernel/request.py)."""
    t0 = time.perf_counter()
    sums = part.kernel.evaluate(request)
    return TaskResult(sums, time.perf_counter() - t0, os.getpid())


def partition_pullback(part: ResidentPartition, request: Request, v: np.ndarray) -> TaskResult:
    t0 = time.perf_counter()
    out = np.asarray(part.kernel.pullback_of(request, v), dtype=np.float64)
    return TaskResult(out, time.perf_counter() - t0, os.getpid())


def partition_absmax(part: ResidentPartition) -> TaskResult:
    """max |X| (K,) and max |dm| (M,) per column of the partition."""
    t0 = time.perf_counter()
    out = part.kernel.column_absmax()
    return TaskResult(out, time.perf_counter() - t0, os.getpid())


def partition_within_covariance(part: ResidentPartition, inv_scale: np.ndarray) -> TaskResult:
    t0 = time.perf_counter()
    out = part.kernel.within_set_covariance(inv_scale)
    return TaskResult(out, time.perf_counter() - t0, os.getpid())


def blas_report() -> dict:
    """Run where partitions are evaluated: this process's pid and its BLAS libraries (library,
    version, threads), as the results file's `versions.blas` lists them."""
    libs = [{"library": b["internal_api"], "version": b["version"], "threads": b["num_threads"]} for b in blas_libraries()]
    return {"pid": os.getpid(), "blas": libs}
