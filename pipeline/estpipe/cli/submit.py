"""Submit a job spec as a batch job (Slurm sbatch; PBS qsub).

The batch script starts a dask scheduler and workers inside the allocation, makes the data when it
is missing, and runs `estpipe estimate --scheduler-file ... --checkpoint ... --resume --out ...`
with the interpreter of this estpipe (unless the spec's `[backend] setup` lines set PYTHON). It is
safe to requeue: a requeued or resubmitted job resumes from its checkpoint. Prints the job id and
where the results and the log will be; `--dry-run` prints the script and submits nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "submit"
EPILOG = "Example: `estpipe submit jobs/slurm.toml --dry-run`"


def command(
    job: Annotated[Path, typer.Argument(help="Job spec (TOML); kind = \"local\" is submitted as a Slurm job, \"pbs\" goes to qsub.", dir_okay=False)],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the batch script; submit nothing.")] = False,
) -> None:
    from estpipe.jobs import load_job_spec, render, submit_job

    spec = load_job_spec(job)
    if dry_run:
        typer.echo(render(spec).script, nl=False)
        return

    def show(submission) -> None:
        typer.echo(f"submitted {submission.kind} job {submission.job_id} ({spec.name})")
        typer.echo(f"  results:    {submission.results}")
        typer.echo(f"  log:        {submission.log}")
        typer.echo(f"  checkpoint: {submission.checkpoint}")
        typer.echo(f"  script:     {submission.script}")

    # printed as soon as the job is accepted, before a signal can end the process
    submit_job(spec, on_submitted=show)
