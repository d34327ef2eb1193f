"""Properties of the MLE over random shapes (the mixed logit's are in tests/test_sml.py): the
scores of every non-simulated model (logit, logit-signed, nested logit, a user's model file)
against complex steps of the log-likelihood, the Hessian of central differences (mle.hessian)
and the textbook logit's exact Hessian against complex steps of the exact score, over sets,
alternatives, K, missing alternatives and panel lengths; in-process equals two real dask
workers on a panel file whose units straddle a naive partition cut; Monte Carlo recovery and
inference over 40 data sets (logit, nested logit); the nested logit at lambda = 1 is the logit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_monte_carlo
from estpipe.data.format import ChoiceData, ChoiceDataFile, read_choice_data, write_choice_data
from estpipe.estimation.mle import HESSIAN_STEP, hessian
from estpipe.kernel import PartitionKernel
from estpipe.kernel.request import Request
from estpipe.models import get_model, resolve
from estpipe.orchestration import EstimateOptions, estimate
from test_mle import modechoice  # noqa: F401  (the fixture)
from test_nested_logit import B_TRUE, LAMBDA_TRUE, NESTS, Facts, _simulate

REPO = Path(__file__).resolve().parents[1]
USER_LOGIT = f"{REPO / 'examples' / 'user_logit.py'}:UserLogit"
H = 1e-30  # complex step: no cancellation, so any h this small is exact to rounding


def _model(which, K, J):
    names = [f"a{j + 1}" for j in range(J)]
    if which == "nested-logit":
        half = max(1, J // 2)
        nests = f"n1={','.join(names[:half])}" + (f"; n2={','.join(names[half:])}" if J - half >= 2 else "")
        return get_model("nested-logit").bind(Facts(K, names), nests=nests)
    if which == "user":
        return resolve(USER_LOGIT)
    return which


@st.composite
def problems(draw):
    """A model, K in 1..3, J in 2..6 alternatives, 2..14 sets each holding a random subset of
    the alternatives (1 to J of them, so set sizes vary within the file), decision makers of 1
    to 4 sets (panel lengths), tiles of 3 to 40 rows, and parameters (lambdas in 0.3..1.8 for the nested logit)."""
    which = draw(st.sampled_from(["logit", "logit-signed", "nested-logit", "user"]))
    K, J = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    n = draw(st.integers(2, 14))
    lengths = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    alts = [np.sort(rng.choice(J, rng.integers(1, J + 1), replace=False)) for _ in range(n)]
    sizes = np.array([len(a) for a in alts])
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    chosen = np.zeros(offsets[-1], dtype=np.int8)
    chosen[offsets[:-1] + rng.integers(0, sizes)] = 1
    panel = np.repeat(np.arange(n), lengths)[:n].astype(np.int64) + 5
    data = ChoiceData(X=rng.standard_normal((offsets[-1], K)), dm=rng.standard_normal((offsets[-1], 2)),
                      offsets=offsets, chosen=chosen, alt=np.concatenate(alts).astype(np.int32), panel=panel)
    model = _model(which, K, J)
    tile_rows = draw(st.integers(3, 40))  # tiles that cut sets' units
    kernel = PartitionKernel(data, model=model, x_names=[f"x{k + 1}" for k in range(K)], tile_rows=tile_rows)
    P = kernel.n_params
    params = np.r_[rng.uniform(-1, 1, K), np.log(rng.uniform(0.3, 1.8, P - K))]
    return which, data, kernel, params, tile_rows


def _complex_loglik(kernel, b, k):
    z = b.astype(complex)
    z[k] += 1j * H
    s = kernel.evaluate(Request.for_likelihood(z, opg=False))
    assert np.iscomplexobj(s.loglik)  # the generic dual path ran (a real loglik would make .imag 0)
    return s


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_scores_and_the_central_difference_hessian_are_complex_steps(problem):
    which, data, kernel, b, tile_rows = problem
    P = len(b)
    s = kernel.evaluate(Request.for_likelihood(b))
    assert s.n_units == len(np.unique(data.panel)) and np.isrealobj(s.loglik)
    steps = [_complex_loglik(kernel, b, k) for k in range(P)]
    cs = np.array([t.loglik.imag / H for t in steps])
    np.testing.assert_allclose(s.score, cs, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(cs).max()))
    # d score / d b by complex steps of the exact score, against mle.hessian's central differences
    exact = np.column_stack([t.score.imag / H for t in steps])
    np.testing.assert_allclose(exact, exact.T, rtol=1e-9, atol=1e-12 * max(1.0, np.abs(exact).max()))

    def score(x):
        return kernel.evaluate(Request.for_likelihood(x, opg=False)).score

    central = hessian(score, b, HESSIAN_STEP * np.maximum(1.0, np.abs(b)))
    np.testing.assert_allclose(central, exact, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(exact).max()))
    if which == "logit":  # the fused kernel's exact Hessian
        fused = PartitionKernel(data, model="logit", tile_rows=tile_rows)
        assert type(fused.strategy).__name__ == "FusedLogit"
        got = fused.evaluate(Request.for_likelihood(b, score=False, opg=False, hessian=True)).hessian
        np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-13 * max(1.0, np.abs(exact).max()))


# -- in-process equals two real dask workers, on units that straddle a naive cut -------------------

def _paneled(path, src, panel_size=7):
    """The file src with its sets grouped into decision makers of `panel_size` consecutive sets."""
    with ChoiceDataFile(src) as f:
        d = f.read_sets(0, f.n_sets)
        x_names, m_names, alt_names = list(f.x_names), list(f.moment_names), list(f.alt_names)
    panel = (np.arange(len(d.offsets) - 1) // panel_size).astype(np.int64)
    write_choice_data(path, ChoiceData(X=d.X, dm=d.dm, offsets=d.offsets, chosen=d.chosen, alt=d.alt, panel=panel),
                      x_names, m_names, alt_names=alt_names)
    return path


def test_two_dask_workers_equal_in_process_and_partitions_keep_units(tmp_path):
    from estpipe.data.problem import read_problem
    from estpipe.execution.planning import plan_partitions, unit_ids

    path = _paneled(tmp_path / "p.h5", _simulate(tmp_path / "n.h5", seed=7, n=1400))
    problem = read_problem(path)
    units = unit_ids(problem)
    assert units is not None and len(np.unique(units)) == 200
    naive = plan_partitions(problem.offsets, 3)
    assert any(units[p.start] == units[p.start - 1] for p in naive[1:])  # a naive cut splits a unit
    planned = plan_partitions(problem.offsets, 3, units)
    assert len(planned) == 3 and planned[0].start == 0 and planned[-1].stop == problem.n_sets
    for p in planned[1:]:
        assert p.start % 7 == 0 and units[p.start] != units[p.start - 1], [(q.start, q.stop) for q in planned]
    for extra in ({}, {"model": "nested-logit", "nests": NESTS}):
        base = estimate(path, EstimateOptions(estimator="mle", **extra))
        dask = estimate(path, EstimateOptions(estimator="mle", workers=2, partitions=3, **extra))
        assert base.converged and dask.converged and dask.telemetry.workers == 2
        assert base.se_type == dask.se_type == "clustered" and dask.n_clusters == 200
        np.testing.assert_allclose(dask.params, base.params, rtol=1e-10, atol=1e-10)
        # the Hessian is a forward difference (error ~1e-8): estimates 1e-10 apart move it by ~1e-8
        np.testing.assert_allclose(dask.std_errors, base.std_errors, rtol=1e-6)
        np.testing.assert_allclose(dask.std_errors_of("classical"), base.std_errors_of("classical"), rtol=1e-6)
        np.testing.assert_allclose(dask.loglik, base.loglik, rtol=1e-12)


# -- Monte Carlo: recovery and inference over 40 data sets -----------------------------------------

LOGIT_TRUE = np.array([0.8, -1.2, 0.4])


def _simulate_logit(path, seed, n=2000):
    """Logit sets of 2 to 5 alternatives, x ~ N(0, 1), b = LOGIT_TRUE, Gumbel errors."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, n)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    X = rng.standard_normal((offsets[-1], 3))
    u = X @ LOGIT_TRUE + rng.gumbel(size=offsets[-1])
    pick = np.array([a + np.argmax(u[a:z]) for a, z in zip(offsets[:-1], offsets[1:])])
    chosen = np.zeros(offsets[-1], dtype=np.int8)
    chosen[pick] = 1
    write_choice_data(path, ChoiceData(X=X, dm=X - np.repeat(X[pick], sizes, axis=0), offsets=offsets, chosen=chosen),
                      ["x1", "x2", "x3"], ["x1", "x2", "x3"], truth=LOGIT_TRUE, truth_names=["x1", "x2", "x3"])
    return path


@pytest.mark.parametrize("which", ["logit", "nested-logit"])
def test_inference_over_40_data_sets(tmp_path, which):
    """Every estimate within 4.5 standard errors of the truth, the 95% intervals covering at a
    binomially consistent rate (pooled over parameters), and the spread of the estimates that of
    the mean standard error."""
    if which == "logit":
        truth, options = LOGIT_TRUE, EstimateOptions(estimator="mle")
    else:
        truth = np.r_[B_TRUE, np.log(LAMBDA_TRUE)]
        options = EstimateOptions(estimator="mle", model="nested-logit", nests=NESTS)
    est, se = [], []
    for seed in range(40):
        path = tmp_path / f"d{seed}.h5"
        if which == "logit":
            _simulate_logit(path, seed=300 + seed)
        else:
            _simulate(path, seed=400 + seed, n=2500)
        r = estimate(path, options)
        assert r.converged, (seed, r.message)
        est.append(r.params)
        se.append(r.std_errors)
        path.unlink()
    coverage, ratio = assert_monte_carlo(est, se, truth)
    print(which, "coverage", coverage, "sd/se", ratio)


# -- the nested logit at lambda = 1 is the logit, at any beta ---------------------------------------

@pytest.mark.parametrize("where", ["modechoice", "simulated"])
def test_every_lambda_at_one_is_the_logit_under_mle(where, modechoice, tmp_path):  # noqa: F811
    path = modechoice if where == "modechoice" else _simulate(tmp_path / "n.h5", seed=9, n=600)
    with ChoiceDataFile(path) as f:
        x_names, alt_names = list(f.x_names), list(f.alt_names)
    data = read_choice_data(path)
    nests = "n1=1,2; n2=3,4" if where == "modechoice" else NESTS
    facts = Facts(len(x_names), alt_names)
    facts.x_names = x_names
    model = get_model("nested-logit").bind(facts, nests=nests)
    K = len(x_names)
    b = np.random.default_rng(3).uniform(-0.05, 0.05, K) if where == "modechoice" else np.array([0.6, -0.4])
    logit = PartitionKernel(data, model="logit").evaluate(Request.for_likelihood(b))
    for fast in (True, False):
        nested = PartitionKernel(data, model=model, fast=fast).evaluate(Request.for_likelihood(np.r_[b, 0.0, 0.0]))
        np.testing.assert_allclose(nested.loglik, logit.loglik, rtol=1e-10)
        np.testing.assert_allclose(nested.score[:K], logit.score, rtol=1e-10, atol=1e-10 * np.abs(logit.score).max())
        np.testing.assert_allclose(nested.opg[:K, :K], logit.opg, rtol=1e-10, atol=1e-10 * np.abs(logit.opg).max())
    # and away from 1 it is not the logit (the test can fail)
    away = PartitionKernel(data, model=model).evaluate(Request.for_likelihood(np.r_[b, -0.5, 0.3]))
    assert abs(away.loglik - logit.loglik) > 1e-3
