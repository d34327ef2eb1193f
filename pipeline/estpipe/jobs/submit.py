"""Submit a job spec as a batch job: render the script, keep a copy next to the logs, sbatch/qsub it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from estpipe.errors import UserError
from estpipe.jobs.render import RenderedJob, render
from estpipe.jobs.spec import JobSpec

SUBMITTERS = {"slurm": ["sbatch", "--parsable"], "pbs": ["qsub"]}
SUBMIT_TIMEOUT = 60


@dataclass(frozen=True)
class Submission:
    """A submitted batch job and where its outputs will be."""

    job_id: str
    kind: str
    script: Path
    log: Path
    results: Path
    checkpoint: Path


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else "(no message)"


def submit_job(spec: JobSpec, *, python: str | None = None) -> Submission:
    """Render `spec` for its batch system and submit it; raise UserError with the system's reason."""
    rendered: RenderedJob = render(spec, python)
    command = SUBMITTERS[rendered.kind]
    if shutil.which(command[0]) is None:
        raise UserError(
            f"{command[0]} is not on PATH, so this machine cannot submit {rendered.kind} jobs; run "
            f"`estpipe submit {spec.source} --dry-run` to see the script, or submit from a login node"
        )
    spec.output.logs.mkdir(parents=True, exist_ok=True)
    script = spec.output.logs / f"{spec.name}.{'sbatch' if rendered.kind == 'slurm' else 'pbs'}"
    script.write_text(rendered.script)
    try:
        done = subprocess.run(
            command + [str(script)], capture_output=True, text=True, timeout=SUBMIT_TIMEOUT,
            cwd=spec.output.logs,
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"{command[0]} did not answer within {SUBMIT_TIMEOUT} s; is the batch system up?") from None
    if done.returncode != 0:
        raise UserError(f"{command[0]} refused {script}: {_one_line(done.stderr or done.stdout)}")
    # sbatch --parsable prints "id" or "id;cluster"; qsub prints "id.server".
    job_id = done.stdout.strip().split(";")[0]
    if not job_id:
        raise UserError(f"{command[0]} printed no job id for {script}: {_one_line(done.stderr)}")
    log = rendered.log.replace("%j", job_id).replace("$PBS_JOBID", job_id)
    return Submission(job_id=job_id, kind=rendered.kind, script=script, log=Path(log), results=rendered.results,
                      checkpoint=rendered.checkpoint)
