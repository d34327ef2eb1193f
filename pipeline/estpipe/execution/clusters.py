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

The dask dashboard is off unless asked for (`dashboard`, --dashboard): a scheduler this process
starts then serves no dashboard, and its HTTP server (health and metrics routes, which dask's
scheduler always runs) listens on loopback at a free port, not on every interface at 8787.
Asked for, a scheduler of this process serves it on 127.0.0.1 at a free port (bokeh needed:
`require_bokeh`); a scheduler elsewhere (an existing cluster, a batch job's) is only asked where
its own is, and the log line says how to reach it through ssh (`dashboard_line`).
"""

from __future__ import annotations

import json
import os
import socket
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
# Where a scheduler of this process listens for HTTP: with the dashboard off only dask's health and
# metrics routes, on loopback at a free port (dask's default, 8787, warns when another cluster of
# this machine has it); with it on, the dashboard there too (an ssh tunnel reaches it).
LOOPBACK_HTTP = "127.0.0.1:0"
DASHBOARD_EXTRA = 'pip install "estpipe[dashboard]"'


def dashboard_problem() -> str | None:
    """Why this process cannot serve a dashboard (bokeh, in the version dask needs, is missing),
    or None."""
    from distributed.versions import BOKEH_REQUIREMENT

    try:
        import bokeh
    except ImportError:
        return f"{term('dashboard')} needs bokeh, which is not installed; {DASHBOARD_EXTRA}"
    if not BOKEH_REQUIREMENT.specifier.contains(bokeh.__version__, prereleases=True):
        return (f"{term('dashboard')} needs {BOKEH_REQUIREMENT} (dask's dashboard), not bokeh {bokeh.__version__}; "
                f"{DASHBOARD_EXTRA}")
    return None


def require_bokeh() -> None:
    problem = dashboard_problem()
    if problem:
        raise UserError(problem)


def scheduler_http_options(dashboard: bool) -> dict:
    """The Scheduler keywords of a scheduler this process starts (see LOOPBACK_HTTP)."""
    return {"dashboard": bool(dashboard), "dashboard_address": LOOPBACK_HTTP}


def _scheduler_http(dask_scheduler=None) -> dict:
    """Run on the scheduler: whether it serves the dashboard, and where its HTTP server listens."""
    server, app = getattr(dask_scheduler, "http_server", None), getattr(dask_scheduler, "http_application", None)
    sockets = list(getattr(server, "_sockets", {}).values()) if server is not None else []
    # the dashboard is a bokeh server application (BokehTornado) added to the scheduler's routes
    bokeh = [a for a in getattr(app, "applications", ()) if any(c.__name__ == "BokehTornado" for c in type(a).__mro__)]
    return {"dashboard": bool(bokeh),
            "addresses": [s.getsockname()[:2] for s in sockets]}


def dashboard_line(client, local: bool) -> str:
    """The log line for the dashboard of the scheduler `client` talks to: its URL, and how to reach
    it from another machine (an ssh tunnel to the scheduler's host; local: this machine's name);
    or a warning when that scheduler serves none (the run goes on without)."""
    address = client.scheduler.address
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    info = client.run_on_scheduler(_scheduler_http)
    if not info["dashboard"] or not info["addresses"]:
        return (f"warning: {term('dashboard')}: the dask scheduler at {address} serves no dashboard (it needs bokeh "
                f"where it runs, {DASHBOARD_EXTRA}, and no --no-dashboard); going on without it")
    bound, port = info["addresses"][0]
    loopback = bound.startswith("127.") or bound == "::1"
    anywhere = bound in ("0.0.0.0", "::", "")
    target = "localhost" if loopback or anywhere else bound  # where the tunnel's far end connects
    if local:
        url, tunnel_host = f"http://{'127.0.0.1' if loopback else host}:{port}/status", socket.gethostname()
    elif loopback:
        url, tunnel_host = None, host  # reachable only on the scheduler's machine
    else:
        url, tunnel_host = f"http://{host if anywhere else bound}:{port}/status", host
    tunnel = f"ssh -L {port}:{target}:{port} {tunnel_host}, then open http://localhost:{port}/status"
    if url is None:
        return f"dashboard: on {host} at 127.0.0.1:{port} only; from your machine: {tunnel}"
    return f"dashboard: {url} (from another machine: {tunnel})"


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
        """The dashboard's log line when one was asked for (None: not asked, or no dask cluster)."""
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
    want_dashboard = False
    local_scheduler = False  # the scheduler runs in this process (its dashboard is on this machine)

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
        return dashboard_line(self.client, self.local_scheduler) if self.want_dashboard else None


def blas_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """max(1, cores // workers): the worker processes share the machine's cores."""
    return max(1, (cpu_count() if cores is None else cores) // max(1, workers))


class Local(DaskCluster):
    """`workers` N > 1: a LocalCluster of N worker processes on loopback, BLAS threads set per
    worker. Its memory is this machine's, checked before any process starts."""

    name = "local"
    new_processes = True
    direct = True
    local_scheduler = True

    def __init__(self, n_workers: int, dashboard: bool = False):
        self.planned_workers = n_workers
        self.want_dashboard = dashboard
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
        # The scheduler's HTTP server (the dashboard only when asked for): LOOPBACK_HTTP.
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
        if self.want_dashboard:
            require_bokeh()
        self.environ_before = dict(os.environ)
        # A signal kills the worker processes (children of this one) before this process dies:
        # registered before they start, so that none is left behind whenever the signal comes.
        self.stop_workers = interrupts.register(interrupts.kill_child_processes, "dask LocalCluster worker processes")
        try:
            try:
                with dask.config.set(config):
                    self.cluster = LocalCluster(
                        n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=LOOPBACK_HTTP if self.want_dashboard else None, env=env,
                        scheduler_kwargs=scheduler_http_options(self.want_dashboard),
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


class Existing(DaskCluster):
    """`scheduler` ADDRESS or `scheduler_file` FILE: a dask cluster someone else started. Within
    `timeout` seconds the scheduler answers and at least one worker has joined; every worker
    present then is used."""

    name = "dask"

    def __init__(self, address: str | None, scheduler_file: str | None, timeout: float, dashboard: bool = False):
        self.address, self.scheduler_file, self.timeout = address, scheduler_file, timeout
        self.want_dashboard = dashboard

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
