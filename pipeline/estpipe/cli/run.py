"""Run a job spec (TOML, see jobs/) on this machine.

Makes the data when its file is missing (simulate or load, as the spec says), then runs
`estpipe estimate` with the spec's options, a checkpoint and `--resume`: running the job again
after a crash or a kill continues from the last checkpoint instead of starting over. Prints the
same table as `estpipe estimate` and writes the results file named in `[output]`.

Back ends (`[backend] kind`): `local`, `dask` (an existing scheduler), or a batch system whose
batch jobs are the dask-jobqueue workers: {estpipe.execution.jobqueue:KINDS}. `estpipe submit`
runs the whole job as one batch job instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "run"
EPILOG = "Example: `estpipe run jobs/seed.toml`"


def command(
    job: Annotated[Path, typer.Argument(help="Job spec (TOML), e.g. jobs/seed.toml.", dir_okay=False)],
    json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
) -> None:
    from estpipe.jobs import load_job_spec
    from estpipe.jobs.run import run_job

    code = run_job(load_job_spec(job), json=json)
    if code:
        raise typer.Exit(code)
