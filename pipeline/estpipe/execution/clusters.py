"""One way to get a cluster: where the partitions live, started (or reached) once, closed once.

    cluster = BACKENDS.get(name).cluster(options)    nothing started yet
    cluster.start()              the workers are there (a dask client in cluster.client, or none)
    cluster.workers()            their addresses
    cluster.available_memory()   MemoryPools: what the workers can take (execution/memory.py)
    cluster.evaluator()          the Evaluator that maps over them; closing it closes the cluster
    cluster.close()              client, workers, interrupt actions, environment: all given back

Implementations: InProcess (no cluster), Local (a LocalCluster of N processes on this machine),
Existing (`scheduler` / `scheduler_file`) and JobQueue (slurm/pbs batch jobs, in
execution/jobqueue.py). Each waits for its workers through `wait_for_workers`, whose one rule is
in its docstring. execution/backends.py names them as job specs do (local, dask, slurm, pbs).
"""

from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

from estpipe import interrupts
from estpipe.errors import UserError, term
from estpipe.execution.dask_backend import (BlasThreads, DaskEvaluator, QuietWorkerLogs, quiet_distributed_logs,
                                            restore_environ, worker_addresses, worker_plugin, workers_available_bytes)
from estpipe.execution.evaluator import Evaluator, InProcessEvaluator
from estpipe.execution.memory import MemoryPool, available_memory, cpu_count

# Seconds between two looks at the scheduler while waiting for workers.
POLL_SECONDS = 0.2


def wait_for_workers(client, wanted: int | None, timeout: float, timed_out: Callable[[int], str], *,
                     reason: Callable[[], str | None] | None = None,
                     refused: Callable[[], str | None] | None = None) -> list[str]:
    """Wait until `wanted` workers have joined the scheduler `client` talks to; return the
    addresses of the workers present then (sorted). The rule: wanted N, wait for N; wanted None
    (an existing cluster, whose size is not ours to choose), wait for at least one, then use all
    present. At most `timeout` seconds; then a UserError: timed_out(workers seen), followed by
    `: reason()` when the batch system has one (the jobs' states). refused(), looked at on every
    poll, ends the wait at once with its message (a batch system that refused a job)."""
    need = 1 if wanted is None else wanted
    deadline = time.monotonic() + timeout
    while True:
        problem = refused() if refused is not None else None
        if problem:
            raise UserError(problem)
        info = client.scheduler_info(n_workers=-1)["workers"]
        present = sorted(a for a, w in info.items() if w.get("status", "running") == "running")
        if len(present) >= need:
            return present
        left = deadline - time.monotonic()
        if left <= 0:
            why = reason() if reason is not None else None
            raise UserError(timed_out(len(present)) + (f": {why}" if why else ""))
        time.sleep(min(POLL_SECONDS, left))


class Cluster(ABC):
    """Where the partitions of a run live (see the module docstring for the protocol)."""

    name: str = ""
    description: str = ""  # the log's and the results' words for it, once started
    client = None  # the dask client, once started (None in-process)
    # Workers known before start (processes of this machine): their memory is checked before
    # any of them starts. None: known once started (an existing cluster, batch jobs).
    planned_workers: int | None = None
    # For the memory check: the workers are processes this run starts (each costs a process),
    # and each kernel's threads (its buffers; 1 where not known before the partitions load).
    new_processes: bool = False
    threads: int = 1

    @abstractmethod
    def start(self) -> None:
        """Start or reach the workers; returns once they have joined (or raises UserError).
        On failure everything started is closed again."""

    @abstractmethod
    def workers(self) -> list[str]:
        """The addresses of the workers, sorted."""

    @abstractmethod
    def available_memory(self) -> list[MemoryPool]:
        """What the workers can still take."""

    @abstractmethod
    def evaluator(self) -> Evaluator:
        """A new evaluator over these workers, nothing loaded; closing it closes this cluster."""

    def dashboard(self) -> str | None:
        """The dashboard's address for the log (None: no dask cluster)."""
        return None

    def close(self) -> None:
        """Give everything back; safe to call twice."""


class InProcess(Cluster):
    """No cluster: partitions in this process, the kernel on every core."""

    name = "local"
    description = "in-process"
    planned_workers = 1

    def __init__(self):
        self.threads = cpu_count()

    def start(self) -> None:
        pass

    def workers(self) -> list[str]:
        return ["this process"]

    def available_memory(self) -> list[MemoryPool]:
        return [MemoryPool("this process", available_memory(), (0,),
                           f"run on a cluster ({term('scheduler')}, {term('jobqueue')}) whose workers together have "
                           "enough memory")]

    def evaluator(self) -> Evaluator:
        return InProcessEvaluator()


class DaskCluster(Cluster):
    """What the dask clusters share: a client, the evaluator over it, the workers it sees."""

    direct = False  # gather results straight from the workers (only where surely reachable)

    def workers(self) -> list[str]:
        return worker_addresses(self.client)

    def available_memory(self) -> list[MemoryPool]:
        addresses = self.workers()
        have = workers_available_bytes(self.client)
        return [MemoryPool(f"worker {a}", have[a], (i,), "add workers or machines (or give each worker more memory)")
                for i, a in enumerate(addresses)]

    def evaluator(self) -> Evaluator:
        return DaskEvaluator(self)

    def dashboard(self) -> str | None:
        return self.client.dashboard_link


def blas_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """max(1, cores // workers): the worker processes share the machine's cores."""
    return max(1, (cpu_count() if cores is None else cores) // max(1, workers))


class Local(DaskCluster):
    """`workers` N > 1: a LocalCluster of N worker processes on loopback, BLAS threads set per
    worker. Its memory is this machine's, checked before any process starts."""

    name = "local"
    new_processes = True
    direct = True

    def __init__(self, n_workers: int):
        self.planned_workers = n_workers
        self.threads = blas_threads_per_worker(n_workers)
        self.cluster = None
        self.environ_before: dict[str, str] | None = None
        self.stop_workers: int | None = None

    def available_memory(self) -> list[MemoryPool]:
        n = self.planned_workers
        return [MemoryPool(f"{term('workers')} {n}", available_memory(), tuple(range(n)),
                           f"use machines with more memory ({term('scheduler')} or {term('jobqueue')} with more workers)")]

    def start(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        workers, threads = self.planned_workers, self.threads
        env = {v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        # The scheduler serves HTTP (the dashboard, or without bokeh its other routes) even when
        # asked for no dashboard, and then on port 8787, warning on stderr when that is taken (by
        # another cluster on this machine): any free port on loopback instead.
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
        self.environ_before = dict(os.environ)
        # A signal kills the worker processes (children of this one) before this process dies:
        # registered before they start, so that none is left behind whenever the signal comes.
        self.stop_workers = interrupts.register(interrupts.kill_child_processes, "dask LocalCluster worker processes")
        try:
            try:
                with dask.config.set(config):
                    self.cluster = LocalCluster(
                        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0", env=env,
                    )
            finally:
                # the workers have their variables now; the caller gets its own back (a worker
                # restarted later sets them again until close() restores them)
                restore_environ(self.environ_before)
            self.client = Client(self.cluster, set_as_default=False)
            self.client.register_plugin(worker_plugin(BlasThreads, threads), name=BlasThreads.name)
            self.client.register_plugin(worker_plugin(QuietWorkerLogs), name=QuietWorkerLogs.name)
        except BaseException:
            self.close()
            raise
        self.description = (f"LocalCluster of {workers} worker processes at {self.cluster.scheduler_address}, "
                            f"{threads} BLAS thread{'s' if threads > 1 else ''} per worker")

    def dashboard(self) -> str | None:
        return self.cluster.dashboard_link if _has_bokeh() else "off (install bokeh for it)"

    def close(self) -> None:
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        try:
            with quiet_distributed_logs():
                try:
                    if client is not None:
                        client.close()  # before the cluster, so the scheduler sees no wanted results lost
                finally:
                    if cluster is not None:
                        cluster.close()
        finally:
            interrupts.unregister(self.stop_workers)
            self.stop_workers = None
            if self.environ_before is not None:
                restore_environ(self.environ_before)


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


class Existing(DaskCluster):
    """`scheduler` ADDRESS or `scheduler_file` FILE: a dask cluster someone else started. Within
    `timeout` seconds the scheduler answers and at least one worker has joined; every worker
    present then is used."""

    name = "dask"

    def __init__(self, address: str | None, scheduler_file: str | None, timeout: float):
        self.address, self.scheduler_file, self.timeout = address, scheduler_file, timeout

    def _address(self) -> str:
        if self.scheduler_file is None:
            return self.address
        sf = Path(self.scheduler_file)
        if not sf.is_file():
            raise UserError(f"{sf}: no such scheduler file; start the scheduler with `dask scheduler --scheduler-file {sf}` first")
        try:
            return json.loads(sf.read_text())["address"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{sf}: not a dask scheduler file (expected JSON with an \"address\"); check "
                            f"{term('scheduler_file')}") from None

    def start(self) -> None:
        from distributed import Client

        address, timeout = self._address(), self.timeout
        deadline = time.monotonic() + timeout
        try:
            self.client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"cannot reach the dask scheduler at {address} (waited up to {timeout:g} s: {reason}); "
                "check the address and that the scheduler is running"
            ) from None
        try:
            n = len(wait_for_workers(
                self.client, None, max(0.0, deadline - time.monotonic()),
                lambda seen: f"the dask scheduler at {address} has no workers (waited {timeout:g} s); start some "
                             f"with `dask worker {address}`"))
        except BaseException:
            self.close()
            raise
        self.description = f"dask cluster at {address}, {n} worker{'s' if n != 1 else ''}"

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
