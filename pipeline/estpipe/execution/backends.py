"""The back ends by the names job specs give them: local, dask and one per batch system of
execution.jobqueue.KINDS. The estimate options choose one (`backend_name`); its Cluster
(execution/clusters.py) is made, not started, by `cluster_for`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from estpipe.execution.clusters import Cluster, Existing, InProcess, Local
from estpipe.execution.jobqueue import KINDS, JobQueue
from estpipe.registry import Registry


@dataclass(frozen=True)
class Backend:
    """A back end: `cluster(options)` is its Cluster for these estimate options (not started)."""

    name: str
    description: str
    make: Callable[[object], Cluster]

    def cluster(self, options) -> Cluster:
        return self.make(options)


def _jobqueue(kind: str) -> Callable[[object], Cluster]:
    return lambda options: JobQueue(kind, options.workers, options.connect_timeout, dashboard=options.dashboard)


BACKENDS: Registry[Backend] = Registry("back end", [
    Backend("local", "this machine: in-process, or a LocalCluster of `workers` processes",
            lambda o: InProcess() if o.workers <= 1 else Local(o.workers, dashboard=o.dashboard)),
    Backend("dask", "an existing dask cluster, at `scheduler` or in `scheduler_file`",
            lambda o: Existing(o.scheduler, o.scheduler_file, o.connect_timeout, dashboard=o.dashboard)),
    *(Backend(kind.name, f"`workers` dask workers as batch jobs: {kind.description}", _jobqueue(kind.name))
      for kind in KINDS.values()),
])


def backend_name(options) -> str:
    """The back end estimate options choose: `scheduler` or `scheduler_file`: dask; `jobqueue`:
    that batch system; otherwise local."""
    if options.scheduler or options.scheduler_file:
        return "dask"
    return options.jobqueue or "local"


def cluster_for(options) -> Cluster:
    """The Cluster (not started) of the back end the options choose; reads workers, scheduler,
    scheduler_file, jobqueue, connect_timeout and dashboard."""
    return BACKENDS.get(backend_name(options)).cluster(options)
