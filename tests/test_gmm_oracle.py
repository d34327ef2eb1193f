"""The optimizer's memoized map/reduces: what is computed twice is not computed twice, and the
stdlib tail probabilities used for p-values agree with scipy.stats."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from estpipe.data.problem import read_problem
from estpipe.execution import InProcessEvaluator, PartitionSource, plan_partitions
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.estimation.inference import chi2_sf, z_table
from estpipe.estimation.optimizers import MomentOracle
from estpipe.data.simulate import simulate_choice_data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "small.h5"
    simulate_choice_data(path, sets=2000, alternatives=(3, 6), params=3, moments=6, seed=5)
    return path


class _Recording(InProcessEvaluator):
    """The real in-process evaluator, recording what each map/reduce was asked for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.asked: list[tuple[bool, bool]] = []

    def evaluate(self, request):
        self.asked.append((request.jacobian, request.covariance))
        return super().evaluate(request)


def _recording(path):
    problem = read_problem(path)
    return _Recording().load(PartitionSource.of(problem, "logit", "dual"), plan_partitions(problem.offsets, 2))


def test_covariance_after_jacobian_adds_only_the_covariance(small):
    ev = _recording(small)
    oracle = MomentOracle(ev, clustered=False)
    b = np.array([0.2, -0.1, 0.3])
    first = oracle.sums(b, jacobian=True)
    both = oracle.sums(b, jacobian=True, covariance=True)
    again = oracle.sums(b, jacobian=False, covariance=True)
    assert ev.asked == [(True, False), (False, True)] and oracle.evaluations == 2
    assert again is both and both.gG is first.gG
    ref = _recording(small).sums(b, jacobian=True, covariance=True, clustered=False)
    np.testing.assert_allclose(both.gG, ref.gG, rtol=1e-12)
    np.testing.assert_allclose(both.S, ref.S, rtol=1e-10)
    assert both.loglik == pytest.approx(ref.loglik, rel=1e-12) and both.n_units == ref.n_units


def test_two_step_costs_one_evaluation_per_point_plus_two_covariance_passes(small):
    """Start check (g, G, S at x0) + each step's new points + S at b1 + S at the estimate: the
    Jacobians at b1 and at the estimate are the optimizer's own, not recomputed."""
    r = estimate(small, EstimateOptions())
    assert r.converged
    assert r.evaluations == 1 + sum(s.evaluations for s in r.steps) + 2


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 20, 21, 101, 1000])
def test_chi2_tail_matches_scipy(df):
    for x in (1e-9, 0.3, 1.0, df / 2, df, 2 * df + 10, 5 * df + 200, 3000.0):
        want = stats.chi2.sf(x, df)
        if want > 1e-290:
            assert chi2_sf(x, df) == pytest.approx(want, rel=1e-11), (x, df)
    assert chi2_sf(0.0, df) == 1.0 and chi2_sf(np.inf, df) == 0.0


def test_normal_p_values_and_interval_match_scipy():
    params = np.array([0.5, -1.2, 3.0, 0.0])
    se = np.array([0.25, 0.4, 0.5, 1.0])
    t = z_table(params, se)
    np.testing.assert_allclose(t["p"], 2 * stats.norm.sf(np.abs(params / se)), rtol=1e-13)
    np.testing.assert_allclose(t["upper"], params + stats.norm.ppf(0.975) * se, rtol=1e-15)
