"""Job specs (TOML) and running them: on this machine (`estpipe run`) or as batch jobs (`estpipe submit`)."""

from estpipe.jobs.render import RenderedJob, render, render_pbs, render_slurm
from estpipe.jobs.spec import JobSpec, load_job_spec, parse_job_spec
from estpipe.jobs.submit import Submission, submit_job

__all__ = [
    "JobSpec",
    "RenderedJob",
    "Submission",
    "load_job_spec",
    "parse_job_spec",
    "render",
    "render_pbs",
    "render_slurm",
    "submit_job",
]
