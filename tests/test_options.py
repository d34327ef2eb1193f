"""EstimateOptions' check, the one the command line, the Python API and job specs share: every
problem at once, choices from the registries, and each line naming its argument in the front
end's vocabulary."""

from __future__ import annotations

import itertools

import pytest

from estpipe.errors import UserError, cli_flag, vocabulary
from estpipe.estimation.optimizers import OPTIMIZERS
from estpipe.execution.jobqueue import KINDS
from estpipe.kernel.derivatives import DERIVATIVES
from estpipe.models import MODELS
from estpipe.orchestration.options import EstimateOptions


def test_every_problem_is_listed_choices_then_values_then_combinations():
    options = EstimateOptions(optimizer="newton", steps=3, tol=-1.0, resume=True, scheduler="tcp://h:1",
                              jobqueue="slurm")
    assert [p.field for p in options.problems()] == ["optimizer", "steps", "tol", "scheduler", "resume"]
    with pytest.raises(UserError, match="^optimizer: unknown optimizer 'newton'"):
        options.validate()


def test_defaults_and_every_registered_choice_pass():
    assert EstimateOptions().problems() == []
    for model, optimizer, jobqueue in itertools.product(MODELS.names, OPTIMIZERS.names, KINDS.names):
        assert EstimateOptions(model=model, optimizer=optimizer, jobqueue=jobqueue, workers=2).problems() == []


@pytest.mark.parametrize(("optimizer", "derivatives"), list(itertools.product(OPTIMIZERS.names, DERIVATIVES.names)))
def test_an_optimizer_that_needs_the_jacobian_refuses_a_gradient_only_mode(optimizer, derivatives):
    refused = OPTIMIZERS[optimizer].needs_jacobian and not DERIVATIVES[derivatives].jacobian
    fields = [p.field for p in EstimateOptions(optimizer=optimizer, derivatives=derivatives).problems()]
    assert fields == (["derivatives"] if refused else [])


def test_messages_name_arguments_as_the_front_end_spells_them():
    options = EstimateOptions(derivatives="adjoint", max_iter=0)
    with vocabulary(cli_flag):
        assert [p.message for p in options.problems()] == [
            "--max-iter must be a whole number >= 1, got 0",
            "--derivatives adjoint gives only the gradient of Q, but gauss-newton needs the moment Jacobian G; "
            "use --optimizer bfgs or l-bfgs-b with adjoint, or --derivatives dual",
        ]
    with vocabulary(lambda a: f"estimate.{a}"):
        assert options.problems()[0].message == "estimate.max_iter must be a whole number >= 1, got 0"


@pytest.mark.parametrize(("values", "field", "text"), [
    pytest.param({"max_iters": 5}, "max_iters", "max_iters: unknown key (did you mean 'max_iter'?)", id="unknown-key"),
    pytest.param({"steps": True}, "steps", "steps must be 1 or 2, got True", id="bool-is-not-a-step-count"),
    pytest.param({"start": [1, "a"]}, "start", "start: entry 2 ('a') is not a number", id="start-not-numbers"),
    pytest.param({"start": 0.5}, "start", "start: 0.5 is not a list of numbers", id="start-not-a-list"),
    pytest.param({"no_cluster": 1}, "no_cluster", "no_cluster must be true or false, got 1", id="not-a-boolean"),
    pytest.param({"optimizer": ["bfgs"]}, "optimizer", "unknown optimizer ['bfgs']", id="choice-not-a-string"),
])
def test_parse_reports_values_of_any_type_without_raising(values, field, text):
    options, problems = EstimateOptions.parse(values, allowed=("max_iter", "steps", "start", "no_cluster", "optimizer"))
    assert [p.field for p in problems] == [field]
    assert text in problems[0].message


def test_start_is_read_from_a_comma_separated_string_or_numbers():
    assert EstimateOptions(start="0.5, -1,2e-1").start == [0.5, -1.0, 0.2]
    assert EstimateOptions(start=(1, 2)).start == [1.0, 2.0]
