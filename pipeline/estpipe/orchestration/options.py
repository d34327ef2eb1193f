"""Every option of `estpipe estimate`, as one dataclass (field names = CLI options, dashes ->
underscores), checked in the order scipy checks its inputs: choices first, then values."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from estpipe.errors import UserError

OPTIMIZERS = ("gauss-newton", "bfgs", "l-bfgs-b")
DERIVATIVES = ("dual", "adjoint", "fd")
STEPS = (1, 2)
JOBQUEUES = ("slurm", "pbs")

# Options that change the estimate; a checkpoint written under other values of these is refused.
# Where and how the work runs (workers, partitions, scheduler), how long it may run (max_iter) and
# where output goes do not change it.
RESULT_OPTIONS = ("model", "optimizer", "derivatives", "steps", "start", "tol", "no_cluster")


@dataclass
class EstimateOptions:
    """The options of `estpipe estimate` (see DESIGN.md, "Command line")."""

    workers: int = 1
    scheduler: str | None = None
    scheduler_file: str | None = None
    jobqueue: str | None = None
    partitions: int | None = None
    model: str = "logit"
    optimizer: str = "gauss-newton"
    derivatives: str = "dual"
    steps: int = 2
    start: list[float] | None = None
    tol: float = 1e-10
    max_iter: int = 200
    no_cluster: bool = False
    out: str | None = None
    checkpoint: str | None = None
    resume: bool = False
    json: bool = False
    connect_timeout: float = 30.0

    def __post_init__(self):
        if isinstance(self.start, str):
            self.start = parse_start(self.start)
        elif self.start is not None:
            self.start = [float(v) for v in self.start]

    @classmethod
    def from_mapping(cls, values: dict) -> "EstimateOptions":
        """From a job spec's [estimate] table (or any mapping); unknown keys are refused."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in values if k.replace("-", "_") not in names]
        if unknown:
            raise UserError(f"unknown estimate option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; allowed: {', '.join(names)}")
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    def result_options(self) -> dict:
        return {k: getattr(self, k) for k in RESULT_OPTIONS}

    def validate(self) -> None:
        """Choices, then values, then combinations; each problem as one line with the fix."""
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if self.derivatives not in DERIVATIVES:
            raise UserError(f"unknown derivatives {self.derivatives!r}; allowed: {', '.join(DERIVATIVES)}")
        if self.steps not in STEPS:
            raise UserError(f"--steps must be 1 or 2, got {self.steps!r}")
        if self.jobqueue is not None and self.jobqueue not in JOBQUEUES:
            raise UserError(f"unknown --jobqueue {self.jobqueue!r}; allowed: {', '.join(JOBQUEUES)}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise UserError(f"--workers must be a whole number >= 1, got {self.workers!r}")
        if self.partitions is not None and (not isinstance(self.partitions, int) or self.partitions < 1):
            raise UserError(f"--partitions must be a whole number >= 1, got {self.partitions!r}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol > 0):
            raise UserError(f"--tol must be a positive number, got {self.tol!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise UserError(f"--max-iter must be a whole number >= 1, got {self.max_iter!r}")
        if not (self.connect_timeout > 0):
            raise UserError(f"--connect-timeout must be positive, got {self.connect_timeout!r}")
        if self.derivatives == "adjoint" and self.optimizer == "gauss-newton":
            raise UserError(
                "--derivatives adjoint gives only the gradient of Q, but gauss-newton needs the moment "
                "Jacobian G; use --optimizer bfgs or l-bfgs-b with adjoint, or --derivatives dual"
            )
        given = [name for name, v in (("--scheduler", self.scheduler), ("--scheduler-file", self.scheduler_file),
                                      ("--jobqueue", self.jobqueue)) if v]
        if len(given) > 1:
            raise UserError(f"{' and '.join(given)} both choose the cluster; give only one")
        if self.resume and not self.checkpoint:
            raise UserError("--resume needs --checkpoint FILE (the checkpoint to continue from)")
        if self.start is not None and not all(math.isfinite(v) for v in self.start):
            raise UserError(f"--start has a non-finite value: {','.join(map(repr, self.start))}")


def parse_start(text: str) -> list[float]:
    """'0.1,-2,3e-1' -> [0.1, -2.0, 0.3]; one line naming the bad entry otherwise."""
    out = []
    for i, word in enumerate(text.split(",")):
        try:
            out.append(float(word.strip()))
        except ValueError:
            raise UserError(f"--start: entry {i + 1} ({word.strip()!r}) is not a number; give comma-separated numbers, e.g. --start 0,0.5,-1") from None
    return out
