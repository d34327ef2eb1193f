"""The Evaluator interface the optimizer loop talks to, and the in-process back end.

Above this line there is one code path: `sums(params, ...)` is the MomentSums of the whole data
(summed over partitions), `pullback(params, v)` is n G' v. How partitions are held and where they
are evaluated is the back end's business.

An evaluator only maps and reduces. Its partitions are loaded by one explicit step,
`load(source, partitions, assignment)`, after the workers are there (execution/clusters.py) and
the memory is checked; closing the evaluator closes its cluster.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from estpipe.execution.planning import Partition
from estpipe.execution.tasks import (PartitionSource, TaskResult, blas_report, load_partition, partition_absmax,
                                     partition_pullback, partition_sums, partition_within_covariance)
from estpipe.kernel import MomentSums
from estpipe.kernel.request import Request


@dataclass
class EvaluatorStats:
    """The telemetry of the map/reduces: how many, wall time, kernel time on the critical path
    (the busiest process: the sum of its partitions' kernel times), and bytes of results that
    came back over the network (pickled; 0 in-process, where nothing is sent), in all and in the
    last one."""

    evaluations: int = 0
    wall_seconds: float = 0.0
    kernel_seconds: float = 0.0
    result_bytes: int = 0
    last_result_bytes: int = 0
    per_evaluation: list[tuple[float, float]] = field(default_factory=list)

    def record(self, wall: float, results: list[TaskResult], nbytes: int) -> None:
        per_process: dict[int, float] = {}
        for r in results:
            per_process[r.pid] = per_process.get(r.pid, 0.0) + r.seconds
        crit = max(per_process.values())
        self.evaluations += 1
        self.wall_seconds += wall
        self.kernel_seconds += crit
        self.result_bytes += nbytes
        self.last_result_bytes = nbytes
        self.per_evaluation.append((wall, crit))

    def overhead_seconds(self) -> float:
        """Median of (wall - kernel critical path) per evaluation: what the back end adds."""
        if not self.per_evaluation:
            return 0.0
        return float(np.median([w - k for w, k in self.per_evaluation]))


class Evaluator(ABC):
    """Sums over all partitions, wherever they live. Use as a context manager or call close()."""

    partitions: list[Partition]
    workers: int
    description: str

    def __init__(self):
        self.stats = EvaluatorStats()
        self.partitions = []

    @abstractmethod
    def load(self, source: PartitionSource, partitions: list[Partition], assignment: list[int]) -> "Evaluator":
        """Load every partition once, partition i on worker assignment[i], where it stays for the
        run; returns self. A partition that cannot be loaded raises its error (a UserError for bad
        values) and nothing stays loaded."""

    @abstractmethod
    def _map(self, fn, *args) -> list[TaskResult]:
        """Run fn(resident, *args) on every partition where it lives; results in partition order."""

    def _result_bytes(self, results: list[TaskResult]) -> int:
        """Bytes the results took to come back: none travel by default (in-process)."""
        return 0

    def evaluate(self, request: Request) -> MomentSums:
        """The sums of all the data for `request` (kernel/request.py), summed over partitions."""
        t0 = time.perf_counter()
        results = self._map(partition_sums, request)
        total = results[0].value
        for r in results[1:]:
            total = total + r.value
        self.stats.record(time.perf_counter() - t0, results, self._result_bytes(results))
        return total

    def pullback_of(self, request: Request, v) -> np.ndarray:
        """n G' v (P,) for v (M,) at request.params, summed over partitions."""
        v = np.ascontiguousarray(v, dtype=np.float64)
        t0 = time.perf_counter()
        results = self._map(partition_pullback, request, v)
        total = np.sum([r.value for r in results], axis=0)
        self.stats.record(time.perf_counter() - t0, results, self._result_bytes(results))
        return total

    def sums(self, params, jacobian: bool = True, covariance: bool = False, clustered: bool = True,
             seed_scale=None, moment_scale=None, fd_steps=None) -> MomentSums:
        """evaluate(Request.of(params, jacobian, covariance, ...))."""
        return self.evaluate(Request.of(np.ascontiguousarray(params, dtype=np.float64), jacobian, covariance,
                                        clustered=clustered, seed_scale=seed_scale, moment_scale=moment_scale,
                                        fd_steps=fd_steps))

    def pullback(self, params, v, seed_scale=None, fd_steps=None) -> np.ndarray:
        """pullback_of(Request.of(params, jacobian=False, ...), v)."""
        return self.pullback_of(Request.of(np.ascontiguousarray(params, dtype=np.float64), False,
                                           seed_scale=seed_scale, fd_steps=fd_steps), v)

    def column_absmax(self) -> tuple[np.ndarray, np.ndarray]:
        """max |X| (K,) and max |dm| (M,) per column over all partitions (not an evaluation)."""
        results = self._map(partition_absmax)
        x = np.max([r.value[0] for r in results], axis=0)
        m = np.max([r.value[1] for r in results], axis=0)
        return x, m

    def within_set_covariance(self, inv_scale: np.ndarray) -> np.ndarray:
        """sum of (x - xbar_set)(x - xbar_set)' over all rows (K, K), x = X * inv_scale."""
        results = self._map(partition_within_covariance, np.asarray(inv_scale, dtype=np.float64))
        return np.sum([r.value[0] for r in results], axis=0)

    @abstractmethod
    def blas(self) -> list[dict]:
        """BLAS library and threads of every process that evaluates partitions."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessEvaluator(Evaluator):
    """The embedded back end (`workers` 1): partitions held in this process, BLAS on every core.
    Results are never pickled: they do not leave the process."""

    def __init__(self):
        super().__init__()
        self.workers = 1
        self.description = "in-process"
        self.residents = []

    def load(self, source: PartitionSource, partitions: list[Partition], assignment: list[int] | None = None):
        self.residents = [load_partition(source, p.start, p.stop) for p in partitions]
        self.partitions = partitions
        return self

    def _map(self, fn, *args) -> list[TaskResult]:
        return [fn(r, *args) for r in self.residents]

    def blas(self) -> list[dict]:
        return [blas_report()]

    def close(self) -> None:
        self.residents = []
