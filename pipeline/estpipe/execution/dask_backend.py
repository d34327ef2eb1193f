"""The dask back end: resident partitions on workers, evaluations that return only sums; and the
dask pieces the clusters of execution/clusters.py share (worker plugins, log filters, addresses).

Each partition is loaded by one task, `load_partition(source, start, stop)`, whose future the
client keeps for the whole run, so the partition stays in that worker's memory. An evaluation
maps `partition_sums(resident, request)` over those futures; the scheduler runs each where its
partition lives (ResidentPartition reports its real size, so moving it never looks cheap) and
only the small TaskResults travel to the client, which adds them. A partition is a pure function
of (file, range): when a worker dies, dask recomputes its partitions from that lineage on the
surviving workers and the evaluation goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import uuid

from estpipe.errors import UserError
from estpipe.execution.evaluator import Evaluator
from estpipe.execution.planning import Partition
from estpipe.execution.tasks import PartitionSource, TaskResult, blas_report, load_partition


class BlasThreads:
    """A dask WorkerPlugin that sets the BLAS thread count once per worker (also on a worker that
    replaces a lost one). The nanny starts workers with OMP/OPENBLAS/MKL_NUM_THREADS=1."""

    name = "estpipe-blas-threads"

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker=None):
        from threadpoolctl import threadpool_limits

        # Not a context manager: the limit is meant to last for the worker's life.
        worker._estpipe_blas_limits = threadpool_limits(limits=self.threads, user_api="blas")

    def teardown(self, worker=None):
        pass

    def transition(self, key, start, finish, **kwargs):
        pass


class _WorkerLogFilter:
    """A logging filter in a worker of estpipe's own LocalCluster, whose log lines land on
    estpipe's stderr. It drops (1) the "Compute Failed" record (with its traceback) of a task that
    raised a UserError: that error travels to the client, which prints its one line; and (2) any
    record once the worker is closing: the run is over, and a heartbeat or transfer cut short by
    the close logs a traceback of a closed stream that means nothing. While the worker runs,
    everything else is shown."""

    def __init__(self, worker):
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.core import Status

        if getattr(self.worker, "status", None) in (Status.closing, Status.closing_gracefully, Status.closed):
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed") and len(args) > 3
                    and str(args[3]).startswith(f"{UserError.__name__}("))


class QuietWorkerLogs:
    """A dask WorkerPlugin that puts a `_WorkerLogFilter` on the handlers of a worker's
    "distributed" logger (every distributed.* record passes them)."""

    name = "estpipe-quiet-worker-logs"

    def setup(self, worker=None):
        quiet = _WorkerLogFilter(worker)
        for handler in logging.getLogger("distributed").handlers:
            handler.addFilter(quiet)

    def teardown(self, worker=None):
        pass

    def transition(self, key, start, finish, **kwargs):
        pass


@contextlib.contextmanager
def quiet_distributed_logs():
    """While estpipe closes a cluster it started: the run is decided, and what dask logs in this
    process as the workers go (closed comms, a nanny killing a slow worker) is noise. CRITICAL
    records still pass."""
    handlers = list(logging.getLogger("distributed").handlers)

    def critical_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL

    for handler in handlers:
        handler.addFilter(critical_only)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(critical_only)


def worker_plugin(plugin_class, *args):
    from distributed.diagnostics.plugin import WorkerPlugin

    class _Plugin(plugin_class, WorkerPlugin):
        pass

    return _Plugin(*args)


def _worker_available_bytes(dask_worker=None) -> int:
    """Run on a worker: bytes it can still take (its memory limit less its RSS, or the machine's
    available memory when it has no limit)."""
    import psutil

    from estpipe.execution.memory import available_memory as machine

    manager = getattr(dask_worker, "memory_manager", None)
    limit = getattr(manager, "memory_limit", None) or getattr(dask_worker, "memory_limit", None)
    if limit:
        return int(limit - psutil.Process().memory_info().rss)
    return int(machine())


def workers_available_bytes(client) -> dict[str, int]:
    """Bytes each worker can still take, by address."""
    return client.run(_worker_available_bytes)


class DaskEvaluator(Evaluator):
    """Partitions resident on the workers of a started dask cluster (execution/clusters.py);
    closing the evaluator closes the cluster."""

    def __init__(self, cluster):
        super().__init__()
        self.cluster = cluster
        self.client = cluster.client
        # direct: gather results straight from the workers, not relayed by the scheduler (one hop
        # less per evaluation); only where the client surely reaches the workers (a LocalCluster)
        self.direct = cluster.direct
        self.description = cluster.description
        self._token = uuid.uuid4().hex[:8]
        self._counter = itertools.count()
        self.addresses = cluster.workers()
        self.workers = len(self.addresses)
        self.residents = []
        self.holders = []

    def load(self, source: PartitionSource, partitions: list[Partition], assignment: list[int]) -> "DaskEvaluator":
        """One task per partition, pinned to worker assignment[i] (allow_other_workers lets dask
        rebuild a partition on any worker when its own is lost), whose future the client keeps
        for the run: the partition stays on that worker."""
        from distributed import wait

        client, addresses = self.client, self.addresses
        self.residents = [
            client.submit(load_partition, source, p.start, p.stop, key=source.key(p.start, p.stop),
                          workers=[addresses[w]], allow_other_workers=True, pure=True)
            for p, w in zip(partitions, assignment)
        ]
        # wait, not gather: the partitions must stay on the workers
        with client.as_current():
            wait(self.residents)
        failed = [f.exception() for f in self.residents if f.status == "error"]
        if failed:
            # let go of the partitions before the caller closes the cluster: a worker closed while
            # the client still wants its results makes the scheduler warn it is losing them
            self.residents = []
            raise failed[0]  # the worker's exception, UserError included
        self.partitions = partitions
        self.holders = [addresses[w] for w in assignment]
        return self

    def _holders(self) -> list[str]:
        """The worker holding each partition: where it was loaded, or, once a worker has left,
        where dask says it is now (rebuilt from its lineage)."""
        live = self.client.scheduler_info().get("workers", {})  # one small round trip (~0.4 ms, 2 workers)
        if any(h not in live for h in self.holders):
            who = self.client.who_has(self.residents)
            self.holders = [(list(who.get(f.key, ())) or [h])[0] for f, h in zip(self.residents, self.holders)]
        return self.holders

    def _map(self, fn, *args) -> list[TaskResult]:
        n = next(self._counter)
        # One submit per partition, restricted (loosely) to the worker that holds it. Without a
        # restriction, a few evaluation tasks over a few partitions look "root-ish" to the
        # scheduler once the evaluations add up (a task group larger than 2x the threads, few
        # dependencies), and root-ish tasks go to any idle worker regardless of where their
        # input lives: the partition was copied across (measured: 722 MB in 3-4 s per
        # evaluation, the data held twice). Loose, so a lost worker's partitions, rebuilt
        # elsewhere, are still evaluated there.
        futures = [
            self.client.submit(fn, resident, *args, key=f"estpipe-{fn.__name__}-{self._token}-{n}-{i}", pure=False,
                               workers=[holder], allow_other_workers=True)
            for i, (resident, holder) in enumerate(zip(self.residents, self._holders()))
        ]
        results = self.client.gather(futures, direct=self.direct)
        del futures
        return results

    def _result_bytes(self, results: list[TaskResult]) -> int:
        """What came back over the network: the results pickled as dask sends them."""
        return sum(len(pickle.dumps(r, protocol=5)) for r in results)

    def blas(self) -> list[dict]:
        """A task pinned to each worker reports its BLAS threads (checked inside a task)."""
        addrs = worker_addresses(self.client)
        futs = [self.client.submit(blas_report, key=f"estpipe-blas-{self._token}-{i}", workers=[a], pure=False)
                for i, a in enumerate(addrs)]
        out = self.client.gather(futs)
        for a, r in zip(addrs, out):
            r["worker"] = a
        return out

    def close(self) -> None:
        # the partitions go first: a worker closed while the client still wants its results
        # makes the scheduler warn it is losing them
        self.residents = []
        self.cluster.close()


def restore_environ(saved: dict[str, str]) -> None:
    """Make os.environ equal to `saved` again. A LocalCluster's nannies write their pre-spawn
    variables (OMP_NUM_THREADS=1, PYTHONHASHSEED, ...) into the calling process's os.environ before
    spawning each worker (and again when they restart one), so every later child of the caller
    (a `nproc`, an sbatch) would inherit one BLAS thread."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def worker_addresses(client) -> list[str]:
    """Every worker's address, sorted (scheduler_info lists only 5 workers unless asked for all)."""
    import inspect

    if "n_workers" in inspect.signature(client.scheduler_info).parameters:
        return sorted(client.scheduler_info(n_workers=-1)["workers"])
    return sorted(client.scheduler_info()["workers"])
