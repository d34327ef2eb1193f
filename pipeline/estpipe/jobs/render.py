"""Batch scripts for a job spec: Slurm (sbatch) and PBS (qsub).

Inside the allocation the script starts a dask scheduler in the batch step and the workers as one
parallel step (Slurm: `srun dask worker`; PBS: `pbsdsh dask worker`), then runs
`estpipe estimate --scheduler-file ... --checkpoint ... --resume --out ...`.

Why srun + `dask scheduler`/`dask worker` rather than dask-mpi: it needs nothing beyond
dask.distributed, which estpipe already depends on (dask-mpi needs mpi4py and an MPI library built
for the cluster), workers are plain Slurm tasks that srun places and cleans up, and the scheduler
file on the shared logs folder is the one handshake, the same one `--scheduler-file` uses for any
existing dask cluster. dask-mpi still works: see README.md, "Running on a cluster".

Requeue safety: `--requeue` and `--open-mode=append` (Slurm), `-r y` and an appended log (PBS);
the data is made under a temporary name and renamed, and the checkpoint is written atomically
after every accepted iteration, so a requeued or resubmitted job resumes from it.

The script runs the interpreter that rendered it (`sys.executable`) unless the spec's setup lines
set PYTHON (they run after the default is set, so `PYTHON=python3` after a `module load` wins).
"""

from __future__ import annotations

import dataclasses

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from estpipe.jobs.spec import JobSpec, LoadSpec

# Seconds the script waits for the scheduler file and all workers before giving up with a message.
SCHEDULER_WAIT = 120
# Where the scheduler's HTTP server listens (execution.clusters.LOOPBACK_HTTP): dask scheduler's
# default is every interface at 8787, the dashboard included whenever bokeh is importable.
SCHEDULER_HTTP = "127.0.0.1:0"


@dataclass(frozen=True)
class RenderedJob:
    """A batch script and where its outputs go; `log` may hold the scheduler's job-id pattern."""

    kind: str
    script: str
    log: str
    results: Path
    checkpoint: Path


def _q(value) -> str:
    return shlex.quote(str(value))


def _command(words: list[str]) -> str:
    return " ".join(_q(w) if not w.startswith('"$') else w for w in words)


def _common_body(spec: JobSpec, python: str, job_id: str, restart: str, after_variables: tuple[str, ...] = ()) -> list[str]:
    """The shell lines shared by Slurm and PBS, up to (not including) starting the workers;
    `after_variables`: lines of the batch system's own once the paths are set."""
    backend, data = spec.backend, spec.data
    lines = [
        "set -euo pipefail",
        "",
        f"PYTHON={_q(python)}",
    ]
    if backend.setup:
        lines += ["# environment set-up from the job spec ([backend] setup; it may set PYTHON)"]
        lines += list(backend.setup)
    lines += [
        "",
        f"DATA={_q(data.path)}",
        f"RESULTS={_q(spec.output.results)}",
        f"CHECKPOINT={_q(spec.output.checkpoint)}",
        f"LOGS={_q(spec.output.logs)}",
        f'SCHEDULER_FILE="$LOGS/{spec.name}-{job_id}.scheduler.json"',
        *after_variables,
        "",
        f'echo "estpipe: job {job_id} (restart {restart}) on $(hostname) at $(date -Is)" >&2',
        'mkdir -p "$LOGS" "$(dirname "$RESULTS")" "$(dirname "$CHECKPOINT")" "$(dirname "$DATA")"',
        "",
        "# Workers first, then the scheduler, so the workers do not log a lost scheduler. The job's",
        "# exit code stays the estimation's (killed workers exit non-zero).",
        "cleanup() {",
        "    local status=$?",
        "    set +e",
        '    if [ -n "${WORKERS_PID:-}" ]; then kill "$WORKERS_PID" 2>/dev/null; wait "$WORKERS_PID" 2>/dev/null; fi',
        '    if [ -n "${SCHEDULER_PID:-}" ]; then kill "$SCHEDULER_PID" 2>/dev/null; wait "$SCHEDULER_PID" 2>/dev/null; fi',
        '    rm -f "$SCHEDULER_FILE"',
        '    exit "$status"',
        "}",
        "trap cleanup EXIT",
        "",
        "# dask's INFO lines would bury estpipe's progress in the log.",
        'export DASK_LOGGING__DISTRIBUTED="${DASK_LOGGING__DISTRIBUTED:-warning}"',
        "# A scheduler file left by an earlier run of this job would point at a dead scheduler.",
        'rm -f "$SCHEDULER_FILE"',
        *_scheduler_comment(backend.dashboard),
        '"$PYTHON" -m dask scheduler --scheduler-file "$SCHEDULER_FILE" --port 0 '
        + ("--dashboard" if backend.dashboard else "--no-dashboard") + f" --dashboard-address {SCHEDULER_HTTP}"
        + (f" --interface {_q(backend.interface)}" if backend.interface else "")
        + " &",
        "SCHEDULER_PID=$!",
        "",
    ]
    return lines


def _scheduler_comment(dashboard: bool) -> list[str]:
    if dashboard:
        return ["# The dask dashboard ([backend] dashboard = true) on this node's loopback at a free port; the",
                "# estimate's log line names the port and the ssh tunnel that reaches it."]
    return ["# No dask dashboard ([backend] dashboard = true asks for one); the scheduler's HTTP server",
            "# (health and metrics only) listens on this node's loopback at a free port."]


def _worker_command(spec: JobSpec, per_process: int) -> str:
    backend = spec.backend
    words = [
        '"$PYTHON"', "-m", "dask", "worker", "--scheduler-file", '"$SCHEDULER_FILE"',
        "--nworkers", str(per_process), "--nthreads", "1", "--memory-limit", backend.memory,
        "--no-dashboard", "--death-timeout", "120", "--local-directory", '"${TMPDIR:-/tmp}"',
    ]
    if backend.interface:
        words += ["--interface", backend.interface]
    return _command(words)


def _data_lines(spec: JobSpec) -> list[str]:
    from estpipe.cli.load import load_argv
    from estpipe.cli.simulate import simulate_argv

    data = spec.data
    if isinstance(data, LoadSpec):
        words = ["load"] + load_argv(data.input, '"$DATA"', **data.arguments())
    else:
        words = ["simulate"] + simulate_argv('"$DATA"', **data.arguments())
    return [
        "",
        "# Make the data when it is missing (while the workers start); it is written under a",
        "# temporary name and renamed, so a cancelled job never leaves a partial file.",
        'if [ ! -f "$DATA" ]; then',
        '    "$PYTHON" -m estpipe ' + _command(words),
        "fi",
    ]


def _estimate_tail(spec: JobSpec) -> list[str]:
    from estpipe.cli.estimate import estimate_argv

    backend = spec.backend
    # The job's own cluster, checkpoint and results (shell variables), then what the spec fixes.
    options = dataclasses.replace(spec.estimate, scheduler_file='"$SCHEDULER_FILE"', checkpoint='"$CHECKPOINT"',
                                  resume=True, out='"$RESULTS"', dashboard=backend.dashboard)
    names = ("scheduler_file", "checkpoint", "resume", "out") + (("dashboard",) if backend.dashboard else ()) \
        + spec.estimate_keys
    estimate = _command(['"$PYTHON"', "-m", "estpipe", "estimate", '"$DATA"'] + estimate_argv(options, names))
    return _data_lines(spec) + [
        "",
        "# Wait (bounded) until every worker has joined, so a worker that cannot start is reported.",
        f'"$PYTHON" -m estpipe.jobs.workers "$SCHEDULER_FILE" {backend.workers} --timeout {backend.worker_timeout}',
        "",
        "# The checkpoint is written after every accepted iteration; --resume continues from it.",
        estimate,
    ]


def render_slurm(spec: JobSpec, python: str | None = None) -> RenderedJob:
    """An sbatch script for `spec` (backend kind slurm)."""
    backend = spec.backend
    python = python or sys.executable
    log = str(spec.output.logs / f"{spec.name}-%j.out")
    mem_per_cpu = max(1, -(-backend.memory_mb // backend.cores))
    head = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.name}",
        f"#SBATCH --nodes={backend.nodes}",
        f"#SBATCH --ntasks={backend.workers}",
        f"#SBATCH --cpus-per-task={backend.cores}",
        f"#SBATCH --mem-per-cpu={mem_per_cpu}M",
        f"#SBATCH --time={backend.walltime}",
    ]
    if backend.partition:
        head.append(f"#SBATCH --partition={backend.partition}")
    if backend.account:
        head.append(f"#SBATCH --account={backend.account}")
    head += [
        f"#SBATCH --output={log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"# Written by `estpipe submit {spec.source.name}`: a dask scheduler here, one dask worker per",
        "# task, then estpipe estimate with checkpoint and resume (safe to requeue or resubmit).",
    ]
    body = _common_body(spec, python, "$SLURM_JOB_ID", "${SLURM_RESTART_COUNT:-0}")
    body += [
        "# One dask worker per Slurm task, each with --cpus-per-task cores for its BLAS.",
        f"srun --ntasks={backend.workers} --cpus-per-task={backend.cores} --kill-on-bad-exit=0 "
        + _worker_command(spec, 1) + " &",
        "WORKERS_PID=$!",
    ]
    body += _estimate_tail(spec)
    return RenderedJob("slurm", "\n".join(head + body) + "\n", log, spec.output.results, spec.output.checkpoint)


def _pbs_walltime(walltime: str) -> str:
    """Slurm's "D-HH:MM:SS" as PBS's "HH:MM:SS" (hours may exceed 24)."""
    if "-" not in walltime:
        return walltime
    days, rest = walltime.split("-", 1)
    hours, minutes, seconds = rest.split(":")
    return f"{int(days) * 24 + int(hours):02d}:{minutes}:{seconds}"


def render_pbs(spec: JobSpec, python: str | None = None) -> RenderedJob:
    """A qsub script for `spec` (backend kind pbs; PBS Pro / OpenPBS `select` syntax)."""
    backend = spec.backend
    python = python or sys.executable
    per_node = backend.workers // backend.nodes
    ncpus = per_node * backend.cores
    mem_mb = per_node * backend.memory_mb
    log = str(spec.output.logs / f"{spec.name}-$PBS_JOBID.out")
    head = [
        "#!/bin/bash",
        f"#PBS -N {spec.name}",
        f"#PBS -l select={backend.nodes}:ncpus={ncpus}:mem={mem_mb}mb",
        f"#PBS -l walltime={_pbs_walltime(backend.walltime)}",
    ]
    if backend.queue:
        head.append(f"#PBS -q {backend.queue}")
    if backend.account:
        head.append(f"#PBS -A {backend.account}")
    head += [
        "#PBS -r y",
        "#PBS -j oe",
        f"#PBS -o {spec.output.logs / (spec.name + '.pbs.out')}",
        f"# Written by `estpipe submit {spec.source.name}`: a dask scheduler here, dask workers on every",
        "# node (pbsdsh), then estpipe estimate with checkpoint and resume (safe to rerun).",
    ]
    # PBS overwrites -o on a rerun; appending to the log from here on keeps every run's.
    append_log = f'mkdir -p "$LOGS"; exec >>"$LOGS/{spec.name}-$PBS_JOBID.out" 2>&1'
    body = _common_body(spec, python, "$PBS_JOBID", "${PBS_RUN_COUNT:-0}", after_variables=(append_log,))
    body += [
        f"# pbsdsh starts one command per node; each runs {per_node} dask worker process(es).",
        "pbsdsh -- " + _worker_command(spec, per_node) + " &",
        "WORKERS_PID=$!",
    ]
    body += _estimate_tail(spec)
    return RenderedJob("pbs", "\n".join(head + body) + "\n", log, spec.output.results, spec.output.checkpoint)


def render(spec: JobSpec, python: str | None = None) -> RenderedJob:
    from estpipe.errors import UserError

    if spec.backend.kind == "local":
        # `estpipe submit` means "this job as a batch job": a local spec becomes a Slurm job with
        # the spec's workers and the default resources of [backend].
        spec = dataclasses.replace(spec, backend=dataclasses.replace(spec.backend, kind="slurm"))
    if spec.backend.kind == "slurm":
        return render_slurm(spec, python)
    if spec.backend.kind == "pbs":
        return render_pbs(spec, python)
    raise UserError(
        f"job spec {spec.source}: backend.kind {spec.backend.kind!r} names an existing dask cluster, "
        "not a batch system; use `estpipe run` for it, or set kind = \"slurm\" or \"pbs\" to submit a batch job"
    )
