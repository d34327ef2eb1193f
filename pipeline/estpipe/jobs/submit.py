"""Submit a job spec as a batch job: render the script, keep a copy next to the logs, sbatch/qsub it.

A signal that stops `estpipe submit` while sbatch/qsub runs must not hide a job the batch system
has accepted: the command runs in its own session (so a Ctrl-C on the terminal does not cut it
off half-way), and an estpipe.interrupts action waits for it (a few seconds at most) and prints
the job id it accepted before the process dies.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from estpipe import interrupts
from estpipe.errors import UserError
from estpipe.outputs import check_writable
from estpipe.jobs.render import RenderedJob, render
from estpipe.jobs.spec import JobSpec

SUBMITTERS = {"slurm": ["sbatch", "--parsable"], "pbs": ["qsub"]}
SUBMIT_TIMEOUT = 60
# Seconds a signal waits for an sbatch/qsub in flight: longer than the interrupts' usual bound,
# since a job the batch system accepts must never be hidden, and a busy controller can take several
# seconds to answer (CI saw more than 5 s on this machine's one-node Slurm).
SUBMIT_WAIT_SECONDS = 20.0


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


def _job_id(stdout: str) -> str:
    # sbatch --parsable prints "id" or "id;cluster"; qsub prints "id.server".
    return stdout.strip().split(";")[0]


class _SubmitWatch:
    """The estpipe.interrupts action of a running sbatch/qsub: wait for it (bounded) and say
    which job it accepted. Its output goes to files, which the action can read after the wait."""

    def __init__(self, command: list[str], script: Path, kind: str):
        self.command, self.script, self.kind = command, script, kind
        self.proc: subprocess.Popen | None = None
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()

    def output(self) -> tuple[str, str]:
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
        return texts[0], texts[1]

    def __call__(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            interrupts.say(f"waiting (at most {SUBMIT_WAIT_SECONDS:.0f} s) for {self.command[0]} to say whether it "
                           f"accepted {self.script}")
        try:
            self.proc.wait(timeout=SUBMIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            interrupts.say(f"interrupted while {self.command[0]} {self.script} was still running; check the queue "
                           f"({'squeue' if self.kind == 'slurm' else 'qstat'}) for the job")
            return
        job_id = _job_id(self.output()[0]) if self.proc.returncode == 0 else ""
        if job_id:
            cancel = "scancel" if self.kind == "slurm" else "qdel"
            interrupts.say(f"interrupted after {self.command[0]} accepted {self.kind} job {job_id} ({self.script}); "
                           f"it stays queued: `{cancel} {job_id}` cancels it")

    def close(self) -> None:
        self.out.close()
        self.err.close()


def submit_job(spec: JobSpec, *, python: str | None = None,
               on_submitted: Callable[[Submission], None] | None = None) -> Submission:
    """Render `spec` for its batch system and submit it; raise UserError with the system's reason.

    on_submitted(submission): called as soon as the job is accepted, with signals held back until
    it returns (the CLI prints the job id there, so no signal can lose it)."""
    rendered: RenderedJob = render(spec, python)
    command = SUBMITTERS[rendered.kind]
    if shutil.which(command[0]) is None:
        raise UserError(
            f"{command[0]} is not on PATH, so this machine cannot submit {rendered.kind} jobs; run "
            f"`estpipe submit {spec.source} --dry-run` to see the script, or submit from a login node"
        )
    spec.output.logs.mkdir(parents=True, exist_ok=True)
    script = spec.output.logs / f"{spec.name}.{'sbatch' if rendered.kind == 'slurm' else 'pbs'}"
    check_writable(script, "[output] logs:")
    for path, what in ((rendered.results, "[output] results"), (rendered.checkpoint, "[output] checkpoint")):
        if Path(path).parent.is_dir():  # a folder the batch job makes itself is checked there
            check_writable(path, what)
    partial = interrupts.register(interrupts.remove_file(script), str(script))
    try:
        script.write_text(rendered.script)
    finally:
        interrupts.unregister(partial)
    watch = _SubmitWatch(command, script, rendered.kind)
    action = None
    try:
        with interrupts.deferred():
            action = interrupts.register(watch, f"{command[0]} {script}")
            watch.proc = subprocess.Popen(command + [str(script)], stdout=watch.out, stderr=watch.err,
                                          cwd=spec.output.logs, start_new_session=True)
        try:
            watch.proc.wait(timeout=SUBMIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            watch.proc.kill()
            raise UserError(f"{command[0]} did not answer within {SUBMIT_TIMEOUT} s; is the batch system up?") from None
        stdout, stderr = watch.output()
        if watch.proc.returncode != 0:
            raise UserError(f"{command[0]} refused {script}: {_one_line(stderr or stdout)}")
        job_id = _job_id(stdout)
        if not job_id:
            raise UserError(f"{command[0]} printed no job id for {script}: {_one_line(stderr)}")
        log = rendered.log.replace("%j", job_id).replace("$PBS_JOBID", job_id)
        submission = Submission(job_id=job_id, kind=rendered.kind, script=script, log=Path(log),
                                results=rendered.results, checkpoint=rendered.checkpoint)
        with interrupts.deferred():
            if on_submitted is not None:
                on_submitted(submission)
            interrupts.unregister(action)
        return submission
    finally:
        interrupts.unregister(action)
        watch.close()
