"""Every option of `estpipe estimate`, as one dataclass (field names = CLI options, dashes ->
underscores), and its check: the one definition the command line, the Python API and job specs
share.

`problems()` lists every problem in the order scipy checks its inputs: choices (read from the
registries of the layers that implement them), then values, then combinations. Each is one line
that names its argument first, as the current front end spells it (`errors.term`): `--max-iter`
on the command line, `estimate.max_iter` in a job spec, `max_iter` in Python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Mapping, NamedTuple

from estpipe.errors import UserError, term
from estpipe.estimation.estimators import ESTIMATORS
from estpipe.estimation.mle import DEFAULT_OPTIMIZER as MLE_DEFAULT_OPTIMIZER, MLE_OPTIMIZERS
from estpipe.estimation.optimizers import OPTIMIZERS
from estpipe.execution.clusters import dashboard_problem
from estpipe.execution.jobqueue import KINDS
from estpipe.kernel.derivatives import DERIVATIVES
from estpipe.registry import did_you_mean
from estpipe.models import model_problem
from estpipe.registry import did_you_mean
from estpipe.text import either

STEPS = (1, 2)
# The options that name a choice, each checked against its registry (the registry's `argument` is
# the field; a field whose default is None may stay None: no batch system). The model is checked
# by models.model_problem: a registered model, a user's file "path.py:Class" or an installed one.
CHOICES = (ESTIMATORS, DERIVATIVES, KINDS)  # the optimizer's registry depends on the estimator

# Options that change the estimate; a checkpoint written under other values of these is refused.
# Where and how the work runs (workers, partitions, scheduler), how long it may run (max_iter) and
# where output goes do not change it. (The estimator at its default, gmm, is left out of a
# checkpoint's options, so that checkpoints written before it existed stay valid.)
# --se: the default robust (the sandwich; "clustered" when the file has clusters or panel units),
# classical ((-H)^-1) or bhhh (the inverse OPG over units).
SE_TYPES = ("robust", "classical", "bhhh")
RESULT_OPTIONS = ("estimator", "model", "random", "correlated", "nests", "draws", "draws_kind", "draws_seed", "panel", "optimizer",
                  "derivatives", "steps", "start", "tol", "no_cluster")
# The options a model takes (models/spec.py): given to the model's bind, which refuses the ones it
# does not take. Their defaults mean "not given".
MODEL_OPTIONS = ("random", "correlated", "nests", "draws", "draws_kind", "draws_seed", "panel")


class Problem(NamedTuple):
    """One problem of a set of options: the field (its API name) and one line that names it first."""

    field: str
    message: str


@dataclass
class EstimateOptions:
    """The options of `estpipe estimate` (see DESIGN.md, "Command line").

    start: a list of numbers or, as the command line gives it, one comma-separated string."""

    workers: int = 1
    scheduler: str | None = None
    scheduler_file: str | None = None
    jobqueue: str | None = None
    partitions: int | None = None
    estimator: str = "gmm"
    model: str = "logit"
    random: str | None = None
    correlated: bool = False
    nests: str | None = None
    draws: int | None = None
    draws_kind: str | None = None
    draws_seed: int | None = None
    panel: bool = False
    optimizer: str | None = None  # None: the estimator's default (gauss-newton for gmm, MLE_DEFAULT_OPTIMIZER for mle)
    derivatives: str = "dual"
    steps: int = 2
    start: list[float] | None = None
    tol: float = 1e-10
    max_iter: int = 200
    no_cluster: bool = False
    se: str | None = None  # mle: which covariance std_errors hold (SE_TYPES); None: robust (clustered with clusters)
    out: str | None = None
    report: str | None = None  # the HTML report (estpipe/report.py), written at the end
    checkpoint: str | None = None
    resume: bool = False
    json: bool = False
    connect_timeout: float = 30.0
    # Serve the dask dashboard: on 127.0.0.1 of this machine for the clusters this process starts
    # (bokeh needed), or print where an existing or batch cluster's scheduler serves its own.
    dashboard: bool = False

    def __post_init__(self):
        # A start that is not numbers stays as given, for problems() to name.
        if self.start is not None:
            values, _ = _start_values(self.start)
            if values is not None:
                self.start = values
        if self.optimizer is None:
            self.optimizer = MLE_DEFAULT_OPTIMIZER if self.estimator == "mle" else "gauss-newton"

    @classmethod
    def parse(cls, values: Mapping, allowed: Iterable[str] | None = None) -> tuple["EstimateOptions", list[Problem]]:
        """Options from a mapping of field names to values (a job spec's [estimate] table), and
        every problem: keys not in `allowed` (default: every field), with a guess, then problems()."""
        allowed = tuple(allowed) if allowed is not None else tuple(f.name for f in fields(cls))
        unknown = [Problem(key, f"{term(key)}: unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
                   for key in values if key not in allowed]
        options = cls(**{key: value for key, value in values.items() if key in allowed})
        return options, unknown + options.problems()

    def to_dict(self) -> dict:
        return asdict(self)

    def result_options(self) -> dict:
        """The options that change the estimate (a checkpoint of others is refused). GMM's
        `steps` means nothing to the MLE, so it is not among the MLE's."""
        skip = {"estimator"} if self.estimator == "gmm" else {"steps"}
        return {k: getattr(self, k) for k in RESULT_OPTIONS if k not in skip}

    def model_options(self) -> dict:
        """The model options given (not at their defaults), for ModelSpec."""
        defaults = {f.name: f.default for f in fields(self)}
        return {k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) != defaults[k]}

    def problems(self) -> list[Problem]:
        """Every problem, choices first, then values, then combinations (empty: the options are fine)."""
        found: list[Problem] = []

        def add(field: str, message: str) -> None:
            found.append(Problem(field, message))

        # -- choices
        optional = {f.name for f in fields(self) if f.default is None}
        problem = model_problem(self.model)
        if problem is not None:
            add("model", f"{term('model')}: {problem}")
        for registry in CHOICES:
            value = getattr(self, registry.argument)
            if value is None and registry.argument in optional:
                continue
            problem = registry.problem(value)
            if problem is not None:
                add(registry.argument, f"{term(registry.argument)}: {problem}")
        mle = self.estimator == "mle"
        own, other = (MLE_OPTIMIZERS, OPTIMIZERS) if mle else (OPTIMIZERS, MLE_OPTIMIZERS)
        if self.optimizer in other and self.optimizer not in own:
            add("optimizer", f"{term('optimizer')} {self.optimizer} is an optimizer of {term('estimator')} "
                f"{'gmm' if mle else 'mle'}; {term('estimator')} {'mle' if mle else 'gmm'} takes {either(own.names)}")
        elif (problem := own.problem(self.optimizer)) is not None:
            add("optimizer", f"{term('optimizer')}: {problem}")

        # -- values
        if not _whole(self.steps) or self.steps not in STEPS:
            add("steps", f"{term('steps')} must be {either(map(str, STEPS))}, got {self.steps!r}")
        if self.start is not None:
            values, problem = _start_values(self.start)
            if problem is not None:
                add("start", problem)
            elif not all(math.isfinite(v) for v in values):
                add("start", f"{term('start')} has a non-finite value: {','.join(map(repr, values))}")
        if not (_number(self.tol) and math.isfinite(self.tol) and self.tol > 0):
            add("tol", f"{term('tol')} must be a positive number, got {self.tol!r}")
        for field, value, optional in (("max_iter", self.max_iter, False), ("workers", self.workers, False),
                                       ("partitions", self.partitions, True)):
            if not (optional and value is None) and not (_whole(value) and value >= 1):
                add(field, f"{term(field)} must be a whole number >= 1, got {value!r}")
        if not (_number(self.connect_timeout) and self.connect_timeout > 0):
            add("connect_timeout", f"{term('connect_timeout')} must be positive, got {self.connect_timeout!r}")
        if self.se is not None and self.se not in SE_TYPES:
            add("se", f"{term('se')} {self.se!r} is not one of {', '.join(SE_TYPES)}{did_you_mean(self.se, SE_TYPES)}")
        elif self.se is not None and self.estimator != "mle":
            add("se", f"{term('se')} chooses among the standard errors of {term('estimator')} mle; GMM's are the "
                      f"sandwich of its last step (clustered with the file's clusters unless {term('no_cluster')})")
        for field in ("no_cluster", "resume", "json", "correlated", "panel", "dashboard"):
            if not isinstance(getattr(self, field), bool):
                add(field, f"{term(field)} must be true or false, got {getattr(self, field)!r}")

        # -- combinations
        if not mle and not any(p.field in ("optimizer", "derivatives") for p in found):
            optimizer, mode = OPTIMIZERS[self.optimizer], DERIVATIVES[self.derivatives]
            if optimizer.needs_jacobian and not mode.jacobian:
                free = [o.name for o in OPTIMIZERS.values() if not o.needs_jacobian]
                full = next(m.name for m in DERIVATIVES.values() if m.jacobian)
                add("derivatives",
                    f"{term('derivatives')} {mode.name} gives only the gradient of Q, but {optimizer.name} needs the "
                    f"moment Jacobian G; use {term('optimizer')} {either(free)} with {mode.name}, or "
                    f"{term('derivatives')} {full}")
        if self.estimator == "mle" and not found:
            if self.derivatives == "adjoint" and MLE_OPTIMIZERS[self.optimizer].needs_opg:
                add("derivatives", f"{term('derivatives')} adjoint: {term('optimizer')} {self.optimizer} needs the "
                    f"score of every unit (its OPG), which the adjoint's one summed gradient does not give; leave "
                    f"{term('derivatives')} at dual")
            elif self.derivatives != "dual":
                add("derivatives", f"{term('derivatives')} {self.derivatives}: {term('estimator')} mle takes its scores "
                    f"from dual blocks only so far; leave {term('derivatives')} at dual")
        given = [field for field in ("scheduler", "scheduler_file", "jobqueue") if getattr(self, field)]
        if len(given) > 1:
            add(given[0], f"{' and '.join(map(term, given))} both choose the cluster; give only one")
        if self.dashboard is True and not (self.scheduler or self.scheduler_file):
            if not self.jobqueue and _whole(self.workers) and self.workers <= 1:
                add("dashboard", f"{term('dashboard')} shows a dask cluster's work, and {term('workers')} 1 runs "
                                 f"in-process without one; add {term('workers')} N (N > 1) or leave out {term('dashboard')}")
            elif (problem := dashboard_problem()) is not None:
                add("dashboard", problem)
        if self.resume and not self.checkpoint:
            add("resume", f"{term('resume')} needs {term('checkpoint')} FILE (the checkpoint to continue from)")
        return found

    def validate(self) -> None:
        """Raise the first of problems() as a UserError (one line with the fix)."""
        found = self.problems()
        if found:
            raise UserError(found[0].message)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _start_values(value) -> tuple[list[float] | None, str | None]:
    """The start vector from '0.1,-2,3e-1' or a sequence of numbers, or None and why not."""
    text = isinstance(value, str)
    try:
        entries = value.split(",") if text else list(value)
    except TypeError:
        entries = None
    if not entries:
        return None, f"{term('start')}: {value!r} is not a list of numbers; give one number per parameter"
    out = []
    for i, entry in enumerate(entries):
        try:
            if isinstance(entry, bool):
                raise TypeError
            out.append(float(entry.strip() if isinstance(entry, str) else entry))
        except (TypeError, ValueError):
            shown = entry.strip() if isinstance(entry, str) else entry
            fix = (f"give comma-separated numbers, e.g. {term('start')} 0,0.5,-1" if text
                   else "give numbers, one per parameter")
            return None, f"{term('start')}: entry {i + 1} ({shown!r}) is not a number; {fix}"
    return out, None
