"""The dask back end: resident partitions on workers, evaluations that return only sums.

Each partition is loaded by one task, `load_partition(path, start, stop, model, derivatives)`,
whose future the client keeps for the whole run, so the partition stays in that worker's memory.
An evaluation maps `partition_sums(resident, params, ...)` over those futures; the scheduler runs
each where its partition lives (ResidentPartition reports its real size, so moving it never looks
cheap) and only the small TaskResults travel to the client, which adds them. A partition is a
pure function of (file, range): when a worker dies, dask recomputes its partitions from that
lineage on the surviving workers and the evaluation goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import pickle
import uuid
from pathlib import Path

from estpipe import interrupts
from estpipe.errors import UserError
from estpipe.execution.evaluator import Evaluator
from estpipe.execution.memory import available_memory, check_fits_machine, check_fits_workers, plan_memory
from estpipe.execution.planning import Partition
from estpipe.execution.tasks import PartitionSource, TaskResult, blas_report, load_partition
from estpipe.text import count

# Seconds to wait for an existing cluster's workers once the scheduler answered.
WORKER_WAIT_SECONDS = 60.0


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """max(1, cores // workers): the worker processes share the machine's cores."""
    return max(1, (cpu_cores() if cores is None else cores) // max(1, workers))


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


def _worker_plugin(plugin_class, *args):
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


class DaskEvaluator(Evaluator):
    """Partitions resident on the workers of a dask cluster reached through `client`."""

    def __init__(self, client, description: str, cluster=None, direct: bool = False,
                 environ: dict[str, str] | None = None):
        super().__init__()
        self.client = client
        # the caller's environment before the cluster started, put back after it closes
        self.environ = environ
        self.interrupt_action = None  # estpipe.interrupts token of the cluster's cleanup, if any
        # direct: gather results straight from the workers, not relayed by the scheduler (one hop
        # less per evaluation); only where the client surely reaches the workers (a LocalCluster)
        self.direct = direct
        self.cluster = cluster
        self.description = description
        self._token = uuid.uuid4().hex[:8]
        self._counter = itertools.count()
        self.addresses = worker_addresses(client)
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
        live = self.client.scheduler_info().get("workers", {})  # the client's cached copy: no round trip
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
        self.residents = []
        with quiet_distributed_logs() if self.cluster is not None else contextlib.nullcontext():
            self._close()

    def _close(self) -> None:
        try:
            self.client.close()
        finally:
            try:
                if self.cluster is not None:
                    self.cluster.close()
            finally:
                interrupts.unregister(self.interrupt_action)
                if self.environ is not None:
                    restore_environ(self.environ)


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


def _memory_checker(partitions, K, M, has_chosen, has_cluster, client, new_processes: bool, model: str = "logit",
                    derivatives: str = "dual"):
    """A check run once the workers are known: per worker against what that worker has (kernel
    buffers for one thread each: their BLAS threads are not known before they load)."""

    def check(assignment, addresses):
        plan = plan_memory(partitions, assignment, len(addresses), K, M, has_chosen, has_cluster, new_processes,
                           model=model, derivatives=derivatives)
        avail = client.run(_worker_available_bytes)
        check_fits_workers(plan, [avail[a] for a in addresses], addresses)

    return check


def start_local_cluster(workers: int, path, partitions, K, M, has_chosen, has_cluster, model, derivatives,
                        fingerprint, log) -> DaskEvaluator:
    """`--workers N`: a LocalCluster of N worker processes on loopback, BLAS threads set per worker.

    Memory is checked against this machine before any process starts."""
    assignment = [i % workers for i in range(len(partitions))]
    threads = blas_threads_per_worker(workers)
    plan = plan_memory(partitions, assignment, workers, K, M, has_chosen, has_cluster, new_processes=True,
                       model=model, derivatives=derivatives, threads=threads)
    check_fits_machine(plan, available_memory(), f"--workers {workers}",
                       "use machines with more memory (--scheduler or --jobqueue with more workers)")
    import dask
    from distributed import Client, LocalCluster

    env = {v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    # The scheduler serves HTTP (the dashboard, or without bokeh its other routes) even when
    # asked for no dashboard, and then on port 8787, warning on stderr when that is taken (by
    # another cluster on this machine): any free port on loopback instead.
    dashboard = _has_bokeh()
    # Resident partitions must never be spilled to disk: they are the working set. Work stealing
    # off: an idle worker stole a queued evaluation from a busy one and fetched its partition
    # (hundreds of MB) to run it, so one evaluation took seconds and the data were held twice
    # (measured: 4.9 s evaluations instead of 0.3 s, and the 2.38 GB peak with --workers 2).
    # Nor MALLOC_TRIM_THRESHOLD_, which the nanny sets by default: it fixes glibc's mmap threshold
    # at 128 KiB, so every HDF5 chunk buffer (a few MB) is a fresh mapping faulted in again;
    # reading a partition took 3.5x as long (measured 0.55 s against 0.16 s for 0.72 GB).
    # Resident partitions and reused kernel buffers leave nothing for trimming to return.
    environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", None) or {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    config = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
              "distributed.scheduler.work-stealing": False, "distributed.nanny.pre-spawn-environ": environ}
    environ_before = dict(os.environ)
    # A signal kills the worker processes (children of this one) before this process dies:
    # registered before they start, so that none is left behind whenever the signal comes.
    stop_workers = interrupts.register(interrupts.kill_child_processes, "dask LocalCluster worker processes")
    try:
        with dask.config.set(config):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", env=env,
            )
    except BaseException:
        interrupts.unregister(stop_workers)
        raise
    finally:
        # the workers have their variables now; the caller gets its own back (a worker restarted
        # later sets them again until close() restores them)
        restore_environ(environ_before)
    client = None
    try:
        client = Client(cluster, set_as_default=False)
        client.register_plugin(_worker_plugin(BlasThreads, threads), name=BlasThreads.name)
        client.register_plugin(_worker_plugin(QuietWorkerLogs), name=QuietWorkerLogs.name)
        where = f"LocalCluster of {workers} worker processes at {cluster.scheduler_address}, {threads} BLAS thread{'s' if threads > 1 else ''} per worker"
        log(f"dask: {where}; dashboard: {cluster.dashboard_link if dashboard else 'off (install bokeh for it)'}")
        evaluator = DaskEvaluator(client, where, cluster=cluster, direct=True, environ=environ_before)
        evaluator.interrupt_action = stop_workers
        return evaluator.load(PartitionSource(str(Path(path).resolve()), fingerprint, model, derivatives), partitions,
                              assignment)
    except BaseException:
        try:
            with quiet_distributed_logs():
                if client is not None:
                    client.close()  # before the cluster, so the scheduler sees no wanted results lost
                cluster.close()
        finally:
            interrupts.unregister(stop_workers)
            restore_environ(environ_before)
        raise


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def connect_existing(address: str | None, scheduler_file: str | None, timeout: float, path, plan, K, M,
                     has_chosen, has_cluster, model, derivatives, fingerprint, log) -> DaskEvaluator:
    """`--scheduler ADDRESS` or `--scheduler-file FILE`: an existing cluster. An unreachable
    scheduler gives one line naming the address tried, after at most `timeout` seconds.

    plan(n_workers) -> the partitions, called with the number of workers present once connected."""
    from distributed import Client

    if scheduler_file is not None:
        sf = Path(scheduler_file)
        if not sf.is_file():
            raise UserError(f"{sf}: no such scheduler file; start the scheduler with `dask scheduler --scheduler-file {sf}` first")
        try:
            address = json.loads(sf.read_text())["address"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{sf}: not a dask scheduler file (expected JSON with an \"address\"); check --scheduler-file") from None
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot reach the dask scheduler at {address} (waited up to {timeout:g} s: {reason}); "
            "check the address and that the scheduler is running"
        ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=min(timeout, WORKER_WAIT_SECONDS))
        except TimeoutError:
            raise UserError(f"the dask scheduler at {address} has no workers (waited {min(timeout, WORKER_WAIT_SECONDS):g} s); start some with `dask worker {address}`") from None
        n = len(worker_addresses(client))
        partitions = plan(n)
        where = f"dask cluster at {address}, {n} worker{'s' if n != 1 else ''}"
        log(f"dask: {where}; dashboard: {client.dashboard_link}")
        check = _memory_checker(partitions, K, M, has_chosen, has_cluster, client, new_processes=False,
                                model=model, derivatives=derivatives)
        evaluator = DaskEvaluator(client, where)
        assignment = [i % evaluator.workers for i in range(len(partitions))]
        check(assignment, evaluator.addresses)
        return evaluator.load(PartitionSource(str(Path(path).resolve()), fingerprint, model, derivatives), partitions,
                              assignment)
    except BaseException:
        client.close()
        raise


def start_jobqueue(kind: str, workers: int, timeout: float, path, partitions, K, M, has_chosen, has_cluster,
                   model, derivatives, fingerprint, log) -> DaskEvaluator:
    """`--jobqueue slurm|pbs --workers N`: workers as batch jobs, through
    estpipe.execution.jobqueue.start_jobqueue_cluster(kind, workers) (which returns a dask-jobqueue
    cluster with its workers asked for)."""
    try:
        from estpipe.execution.jobqueue import start_jobqueue_cluster
    except ImportError:
        raise UserError("--jobqueue is not available in this estpipe (estpipe.execution.jobqueue is missing)") from None
    from distributed import Client

    cluster = start_jobqueue_cluster(kind, workers)
    try:
        client = Client(cluster, set_as_default=False)
        try:
            client.wait_for_workers(workers, timeout=timeout)
        except TimeoutError:
            raise UserError(
                f"--jobqueue {kind}: {workers} worker job{'s' if workers != 1 else ''} did not connect within {timeout:g} s; "
                "check the batch queue (squeue/qstat) and the job output files"
            ) from None
        where = f"{kind} jobqueue cluster at {cluster.scheduler_address}, {count(workers, 'worker')}"
        log(f"dask: {where}; dashboard: {client.dashboard_link}")
        check = _memory_checker(partitions, K, M, has_chosen, has_cluster, client, new_processes=False,
                                model=model, derivatives=derivatives)
        evaluator = DaskEvaluator(client, where, cluster=cluster)
        evaluator.interrupt_action = getattr(cluster, "_estpipe_cancel_action", None)
        assignment = [i % evaluator.workers for i in range(len(partitions))]
        check(assignment, evaluator.addresses)
        return evaluator.load(PartitionSource(str(Path(path).resolve()), fingerprint, model, derivatives), partitions,
                              assignment)
    except BaseException:
        cluster.close()
        interrupts.unregister(getattr(cluster, "_estpipe_cancel_action", None))
        raise
