"""Run a job spec on this machine: make the data when it is missing, then `estpipe estimate` with a
checkpoint and --resume, so running the job again after a crash continues from the checkpoint.

The estimation is `estpipe estimate` itself (`estpipe.cli.reporters.run_estimate`, the function behind the
CLI command), so the table, the results file and the exit codes are exactly estimate's. Back ends: local (in-process or a
LocalCluster of `workers`), dask (an existing scheduler), and slurm/pbs (dask-jobqueue workers as
batch jobs, for interactive use from a login node; `estpipe submit` is the batch way).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from estpipe.errors import UserError, vocabulary
from estpipe.execution.jobqueue import KINDS, JobQueue
from estpipe.jobs.spec import JobSpec, LoadSpec
from estpipe.orchestration import EstimateOptions
from estpipe.outputs import check_writable, check_writable_folder
from estpipe.text import count


def _log(message: str) -> None:
    print(f"estpipe: {message}", file=sys.stderr)


def prepare_data(spec: JobSpec) -> Path:
    """The job's choice-data file: simulated or loaded when it does not exist yet. Messages and
    notes name the spec's fields (data.x), which are the arguments of simulate and load."""
    with vocabulary(lambda argument: f"data.{argument}"):
        return _prepare_data(spec)


def _prepare_data(spec: JobSpec) -> Path:
    data = spec.data
    if data.path.exists():
        _log(f"data: {data.path} (exists)")
        return data.path
    data.path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, LoadSpec):
        from estpipe.data.load import load_choice_data

        if not data.input.exists():
            raise UserError(f"job spec {spec.source}: data.input {str(data.input)!r} does not exist; give the CSV or Parquet file to load")
        _log(f"data: loading {data.input} -> {data.path}")
        summary = load_choice_data(data.input, data.path, **data.arguments())
        for note in summary.notes:
            _log(f"note: {note}")
    else:
        from estpipe.data.simulate import simulate_choice_data

        _log(f"data: simulating {count(data.sets, 'set')} -> {data.path}")
        simulate_choice_data(data.path, **data.arguments())
    return data.path


def estimate_options(spec: JobSpec, *, scheduler: str | None = None, json: bool = False) -> EstimateOptions:
    """The `estpipe estimate` options for this job on this machine: the spec's [estimate], its
    checkpoint (resumed) and results file, where the work runs and whether it shows the dashboard."""
    backend = spec.backend
    where: dict = {}
    if scheduler is not None:
        where["scheduler"] = scheduler
    elif backend.kind == "local":
        where["workers"] = backend.workers
    elif backend.kind == "dask":
        if backend.address:
            where["scheduler"] = backend.address
        else:
            where["scheduler_file"] = str(backend.scheduler_file)
    return replace(spec.estimate, checkpoint=str(spec.output.checkpoint), resume=True, out=str(spec.output.results),
                   json=json, dashboard=backend.dashboard, **where)


@contextmanager
def _cluster_for(spec: JobSpec):
    """The scheduler address of dask-jobqueue workers for slurm/pbs specs; None otherwise."""
    backend = spec.backend
    if backend.kind not in KINDS:
        yield None
        return
    cluster = JobQueue(
        backend.kind, backend.workers, backend.worker_timeout, cores=backend.cores, memory=backend.memory,
        walltime=backend.walltime, queue=backend.partition or backend.queue, account=backend.account,
        env_lines=backend.setup, log_dir=spec.output.logs, interface=backend.interface, dashboard=backend.dashboard,
    )
    cluster.start()
    try:
        _log(f"{backend.kind}: {backend.workers} dask-jobqueue workers at {cluster.scheduler_address}")
        yield cluster.scheduler_address
    finally:
        cluster.close()


def check_outputs(spec: JobSpec) -> None:
    """Every file the job writes can be written (folders made, a probe file in each), before
    any work: the data file when it is to be made, the results, the checkpoint, and the logs
    of batch-job workers."""
    targets = [(spec.output.results, "[output] results"), (spec.output.checkpoint, "[output] checkpoint")]
    if not spec.data.path.exists():
        targets.insert(0, (spec.data.path, "[data] path"))
    for path, what in targets:
        check_writable_folder(path.parent, what + " folder")
        check_writable(path, what)
    if spec.backend.kind in KINDS:
        check_writable_folder(spec.output.logs, "[output] logs")


def run_job(spec: JobSpec, *, json: bool = False, stdout=None) -> int:
    """Make the data if needed and run the estimation; returns estimate's exit code (0, or 3)."""
    from estpipe.cli.reporters import run_estimate

    check_outputs(spec)
    prepare_data(spec)
    with _cluster_for(spec) as scheduler:
        return run_estimate(spec.data.path, estimate_options(spec, scheduler=scheduler, json=json), stdout=stdout)
