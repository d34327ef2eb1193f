"""dask workers as batch jobs (dask-jobqueue), for `estpipe estimate --jobqueue slurm|pbs --workers N`
and `estpipe run` of a slurm or pbs job spec.

`JobQueue` is the execution.clusters Cluster whose N workers are batch jobs: started, it has
them connected, or it raises a `UserError` with the batch system's reason within a bounded wait.
dask-jobqueue alone does not do that: when sbatch refuses a worker job (say, memory above the
node's) it only logs the error in the background, `scale()` returns, and waiting for workers hangs
until its timeout. So:

1. Slurm: the worker job script is checked first with `sbatch --test-only` (nothing is submitted),
   which gives sbatch's own reason at once.
2. While waiting, errors from job submission that dask-jobqueue logs are captured and raised.
3. At the deadline, the jobs' states and reasons come from squeue/scontrol (qstat for PBS), plus
   the end of a worker's error log, so "pending: Resources" or "FAILED" is what the user reads.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Literal

from estpipe import interrupts
from estpipe.errors import UserError, term
from estpipe.execution.clusters import DaskCluster, require_bokeh, scheduler_http_options, wait_for_workers
from estpipe.execution.dask_backend import quiet_distributed_logs
from estpipe.outputs import check_writable_folder
from estpipe.registry import Choice, Registry
from estpipe.text import count

KINDS: Registry[Choice] = Registry("batch system", argument="jobqueue", entries=[
    Choice("slurm", "Slurm, sbatch"),
    Choice("pbs", "PBS Pro or OpenPBS, qsub"),
])
DEFAULT_WAIT = 120.0


class _SubmitErrors(logging.Handler):
    """Keeps the errors dask-jobqueue logs when a job submission command fails in the background."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        text = str(exc) if exc is not None else record.getMessage()
        if "Command exited with non-zero exit code" in text or "Could not parse job id" in text:
            self.messages.append(text)


def _stderr_of(text: str) -> str:
    """The stderr part of dask-jobqueue's 'Command exited with non-zero exit code' message, one line."""
    match = re.search(r"stderr:\n(.*)", text, re.S)
    body = match.group(1) if match else text
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    return " ".join(lines) or text.strip().replace("\n", " ")


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _preflight_slurm(job_script: str) -> None:
    """Ask sbatch whether the worker job could run (`--test-only` submits nothing)."""
    with interrupts.deferred():
        handle = tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False)
        cleanup = interrupts.register(interrupts.remove_file(handle.name), handle.name)
    try:
        with handle:
            handle.write(job_script)
        done = _run(["sbatch", "--test-only", handle.name])
    finally:
        Path(handle.name).unlink(missing_ok=True)
        interrupts.unregister(cleanup)
    if done.returncode != 0:
        reason = " ".join(line.strip() for line in done.stderr.strip().splitlines() if line.strip())
        raise UserError(f"Slurm refused the dask worker job: {reason}; ask for less (--memory, --cores) or another partition")


def _job_reasons(kind: str, job_ids: list[str], log_dir: Path | None) -> str:
    """What the batch system says about the worker jobs (state and reason), one line."""
    if not job_ids:
        return "no worker job was submitted"
    parts = []
    for job_id in job_ids:
        if kind == "slurm":
            done = _run(["scontrol", "show", "job", job_id])
            fields = dict(re.findall(r"(\w+)=(\S+)", done.stdout))
            state, reason = fields.get("JobState", "unknown"), fields.get("Reason", "None")
            text = f"job {job_id} {state}" + (f" ({reason})" if reason != "None" else "")
        else:
            done = _run(["qstat", "-f", job_id])
            fields = dict(re.findall(r"^\s*(\w+) = (.*)$", done.stdout, re.M))
            text = f"job {job_id} state {fields.get('job_state', 'unknown')}" + (
                f" ({fields['comment']})" if "comment" in fields else ""
            )
        if log_dir is not None:
            err = log_dir / f"{job_id}.err"
            if err.exists():
                tail = [line.strip() for line in err.read_text(errors="replace").splitlines() if line.strip()][-1:]
                if tail:
                    text += f"; its log {err} ends: {tail[0]}"
        parts.append(text)
    return "; ".join(parts)


def _mark_failed(cluster) -> None:
    """Jobs whose submission failed stay 'created', which SpecCluster.close() refuses; mark them failed."""
    from distributed.core import Status

    for job in list(getattr(cluster, "_created", ())):
        if getattr(job, "job_id", None) is None and job.status == Status.created:
            job.status = Status.failed


def _close(cluster) -> None:
    """Close a dask-jobqueue cluster, cancelling its worker jobs."""
    _mark_failed(cluster)
    try:
        cluster.close()
    finally:
        interrupts.unregister(getattr(cluster, "_estpipe_cancel_action", None))


def _job_canceller(cluster):
    """An estpipe.interrupts action: cancel the cluster's worker jobs (scancel / qdel, bounded),
    since a signal ends this process before dask-jobqueue could. Holds the cluster weakly."""
    ref = weakref.ref(cluster)
    cancel = cluster.job_cls.cancel_command

    def action() -> None:
        live = ref()
        if live is None:
            return
        jobs = list(getattr(live, "workers", {}).values()) + list(getattr(live, "_created", ()))
        ids = sorted({str(job.job_id) for job in jobs if getattr(job, "job_id", None)})
        if ids:
            try:
                subprocess.run(shlex.split(cancel) + ids, capture_output=True, timeout=interrupts.ACTION_WAIT_SECONDS)
            except (OSError, subprocess.SubprocessError):
                pass

    return action


class JobQueue(DaskCluster):
    """`workers` dask workers as batch jobs (one job each), connected within `timeout` seconds.

    kind: "slurm" (SLURMCluster, `queue` is the partition) or "pbs" (PBSCluster).
    cores, memory: per worker; walltime: per worker job; env_lines: shell lines run in each job
    before the worker starts (module loads, environment activation). Options left None come from
    dask's jobqueue configuration (jobqueue.yaml or DASK_JOBQUEUE__SLURM__... variables), then
    from the defaults 1 core, 2GB, one hour.
    log_dir: where the worker jobs' logs go (`<job id>.out` / `.err`); default ./dask-worker-logs.
    interface / scheduler_host: the network the workers reach the scheduler on; on one test machine
    use interface="lo" and scheduler_host="127.0.0.1".
    Workers run the interpreter of this process (sys.executable).
    dashboard: the scheduler (in this process) serves the dask dashboard on 127.0.0.1 at a free
    port (an ssh tunnel to this machine reaches it); otherwise none, and its HTTP server listens
    on loopback only. dask's jobqueue `scheduler-options` configuration, when set, still wins.

    start() raises UserError with the batch system's reason when a worker job cannot be submitted
    or the workers have not all connected within `timeout` seconds (nothing is left queued)."""

    def __init__(self, kind: Literal["slurm", "pbs"], workers: int, timeout: float = DEFAULT_WAIT, *,
                 cores: int | None = None, memory: str | None = None, walltime: str | None = None,
                 queue: str | None = None, account: str | None = None,
                 env_lines: tuple[str, ...] | list[str] = (), log_dir: str | Path | None = None,
                 interface: str | None = None, scheduler_host: str | None = None, dashboard: bool = False):
        self.name = self.kind = kind
        self.n_workers, self.timeout = workers, timeout
        self.options = dict(cores=cores, memory=memory, walltime=walltime, queue=queue, account=account)
        self.env_lines, self.interface, self.scheduler_host = list(env_lines), interface, scheduler_host
        self.log_dir = Path(log_dir or "dask-worker-logs").resolve()
        self.want_dashboard = dashboard
        self.local_scheduler = True
        self.cluster = None

    @property
    def scheduler_address(self) -> str:
        return self.cluster.scheduler_address

    def _dask_cluster(self):
        """The dask-jobqueue cluster, its worker job's script ready, no job submitted yet."""
        kind = self.kind
        if kind not in KINDS:
            raise UserError(f"{term('jobqueue')} {kind!r} is not supported; use one of {', '.join(KINDS)}")
        if self.n_workers < 1:
            raise UserError(f"{term('workers')} {self.n_workers}: {term('jobqueue')} needs at least 1 worker")
        submit = "sbatch" if kind == "slurm" else "qsub"
        if shutil.which(submit) is None:
            raise UserError(f"{term('jobqueue')} {kind}: {submit} is not on PATH; run on a login node of a {kind} cluster")
        if self.want_dashboard:
            require_bokeh()
        import dask.config
        from dask_jobqueue import PBSCluster, SLURMCluster

        log_dir = self.log_dir
        check_writable_folder(log_dir, "the dask worker logs")
        out_name = "%j" if kind == "slurm" else "$PBS_JOBID"
        directives = (
            [f"-o {log_dir}/{out_name}.out", f"-e {log_dir}/{out_name}.err"]
            if kind == "slurm"
            else [f"-o {log_dir}", f"-e {log_dir}"]
        )

        def configured(name, default):
            given = self.options[name]
            if given is not None:
                return given
            value = dask.config.get(f"jobqueue.{kind}.{name}", None)
            return default if value is None else value

        scheduler_options = {**scheduler_http_options(self.want_dashboard),
                             **(dask.config.get(f"jobqueue.{kind}.scheduler-options", None) or {})}
        if self.scheduler_host:
            scheduler_options["host"] = self.scheduler_host
        cls = SLURMCluster if kind == "slurm" else PBSCluster
        options = dict(
            cores=configured("cores", 1), processes=1, memory=configured("memory", "2GB"),
            walltime=configured("walltime", "01:00:00"), python=shlex.quote(sys.executable),
            job_script_prologue=self.env_lines, job_extra_directives=directives,
            scheduler_options=scheduler_options,
        )
        for name, value in (("queue", self.options["queue"]), ("account", self.options["account"]),
                            ("interface", self.interface)):
            if value is not None:
                options[name] = value
        return cls(**options)

    def start(self) -> None:
        from distributed import Client

        kind, workers, timeout = self.kind, self.n_workers, self.timeout
        errors = _SubmitErrors()
        watched = [logging.getLogger(name) for name in ("tornado.application", "asyncio", "distributed", "dask_jobqueue")]
        for logger in watched:
            logger.addHandler(errors)
        try:
            self.cluster = cluster = self._dask_cluster()
            cluster._estpipe_cancel_action = interrupts.register(_job_canceller(cluster), f"{kind} dask worker jobs")
            if kind == "slurm":
                _preflight_slurm(cluster.job_script())
            cluster.scale(jobs=workers)
            self.client = Client(cluster, set_as_default=False)

            def job_ids() -> list[str]:
                return [job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)]

            wait_for_workers(
                self.client, workers, timeout,
                lambda seen: f"only {seen} of {workers} dask worker jobs connected within {timeout:.0f} s",
                reason=lambda: _job_reasons(kind, job_ids(), self.log_dir),
                refused=lambda: f"{kind} refused a dask worker job: {_stderr_of(errors.messages[0])}" if errors.messages else None)
        except BaseException:
            self.close()
            raise
        finally:
            for logger in watched:
                logger.removeHandler(errors)
        self.description = f"{kind} jobqueue cluster at {cluster.scheduler_address}, {count(workers, 'worker')}"

    def close(self) -> None:
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        with quiet_distributed_logs():
            try:
                if client is not None:
                    client.close()
            finally:
                if cluster is not None:
                    _close(cluster)
