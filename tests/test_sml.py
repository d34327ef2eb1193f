"""Mixed logit by simulated maximum likelihood (kernel/fused_mixed.py simulated_likelihood_tile):
the fused log-likelihood against an independent loop over units and draws, its scores against
complex steps of that log-likelihood, the Hessian of central differences against complex steps
of the exact score, the identity with the logit at sd = 0, tiles/threads/batches/partitions/
workers that do not change the sums, and recovery and inference on simulated panel data."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_monte_carlo
from estpipe.data.format import ChoiceData, write_choice_data
from estpipe.dual import Segments
from estpipe.estimation.mle import HESSIAN_STEP, hessian
from estpipe.kernel import PartitionKernel
from estpipe.kernel.fused_mixed import simulated_likelihood_tile
from estpipe.kernel.request import Request
from estpipe.kernel.tiles import TileData
from estpipe.models import get_model
from estpipe.orchestration import EstimateOptions, estimate


class Facts:
    def __init__(self, K, panel=True):
        self.x_names = [f"x{k + 1}" for k in range(K)]
        self.alt_names = None
        self.has_panel = panel


def reference_loglik(model, X, offsets, unit, chosen_row, params):
    """log prod_u (1/R) sum_r prod_{t in u} s_t,chosen(r), one unit, one draw, one set at a time
    (complex parameters allowed): the definition, with none of the kernel's algebra."""
    K = X.shape[1]
    params = np.asarray(params, dtype=complex)
    L = np.zeros((model.Kr, model.Kr), dtype=complex)
    for j, (i, l) in enumerate(model._spread_pairs()):
        L[i, l] = params[K + j]
    total = 0.0
    for u in np.unique(unit):
        sets = np.flatnonzero(unit == u)
        eta = model.draws.normals(np.array([u]), 0, model.draws.R)[0]  # (R, Kr)
        l_r = np.zeros(model.draws.R, dtype=complex)
        for r in range(model.draws.R):
            beta = params[:K].copy()
            z = params[[c.column for c in model.random]] + L @ eta[r]
            for i, c in enumerate(model.random):
                beta[c.column] = c.sign * np.exp(z[i]) if c.sign else z[i]
            for t in sets:
                v = X[offsets[t]:offsets[t + 1]] @ beta
                l_r[r] += v[chosen_row[t] - offsets[t]] - np.log(np.sum(np.exp(v)))
        total += np.log(np.mean(np.exp(l_r)))
    return total


@st.composite
def panels(draw):
    K = draw(st.integers(2, 4))
    n_random = draw(st.integers(1, min(3, K)))
    kinds = draw(st.lists(st.sampled_from(["", ":lognormal", ":-lognormal"]), min_size=n_random, max_size=n_random))
    correlated = draw(st.booleans())
    sizes = draw(st.lists(st.integers(1, 5), min_size=2, max_size=9))  # sets of one alternative too
    lengths = draw(st.lists(st.integers(1, 4), min_size=len(sizes), max_size=len(sizes)))  # panel lengths
    seed = draw(st.integers(0, 2**31))
    R = draw(st.integers(1, 25))
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    unit = np.repeat(np.arange(len(lengths)), lengths)[: len(sizes)] + 3
    X = rng.standard_normal((offsets[-1], K))
    chosen_row = offsets[:-1] + rng.integers(0, sizes)
    random = ",".join(f"x{k + 1}{kind}" for k, kind in zip(range(n_random), kinds))
    model = get_model("mixed-logit").bind(Facts(K), random=random, correlated=correlated, draws=R,
                                          draws_kind=draw(st.sampled_from(["sobol", "halton", "pseudo"])),
                                          draws_seed=seed % 97)
    params = rng.uniform(-0.7, 0.7, model.n_params(K))
    if draw(st.booleans()):
        params[K:] = 0.0  # the spread-0 shortcut (the logit start)
    return model, X, offsets, unit, chosen_row, params


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=panels(), batch=st.sampled_from([64, 2000, 8 * 2**20]))
def test_fused_loglik_is_the_definition_and_its_scores_are_complex_steps(problem, batch):
    model, X, offsets, unit, chosen_row, params = problem
    tile = TileData(X=X, seg=Segments(offsets), alt=None, unit=unit, x_names=tuple(model.x_names))
    chosen = (chosen_row, np.arange(len(offsets) - 1))
    ll, null, n, S = simulated_likelihood_tile(model, tile, params, chosen, batch_bytes=batch)
    ref = reference_loglik(model, X, offsets, unit, chosen_row, params).real
    assert n == len(offsets) - 1
    np.testing.assert_allclose(ll, ref, rtol=1e-12, atol=1e-12)
    # a unit's score sits on its first set only
    first = np.r_[True, unit[1:] != unit[:-1]]
    assert np.all(S[~first] == 0)
    h = 1e-30
    P = len(params)
    steps = [reference_loglik(model, X, offsets, unit, chosen_row, params + 1j * h * np.eye(P)[p]).imag / h
             for p in range(P)]
    np.testing.assert_allclose(S.sum(axis=0), steps, rtol=1e-9, atol=1e-10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=panels(), batch=st.sampled_from([64, 2000, 8 * 2**20]))
def test_the_exact_hessian_is_the_complex_step_of_the_exact_score(problem, batch):
    """Every coefficient normal (panels, correlated or not, sets of one alternative, batches of
    draws, spreads at 0 too): the tile's exact Hessian equals complex steps of its exact score
    to rounding; with a lognormal coefficient it has none (differences of the score then)."""
    model, X, offsets, unit, chosen_row, params = problem
    tile = TileData(X=X, seg=Segments(offsets), alt=None, unit=unit, x_names=tuple(model.x_names))
    chosen = (chosen_row, np.arange(len(offsets) - 1))
    ll, null, n, S, H = simulated_likelihood_tile(model, tile, params, chosen, batch_bytes=batch, hessian=True)
    assert ll == pytest.approx(simulated_likelihood_tile(model, tile, params, chosen, batch_bytes=batch)[0], rel=1e-13)
    if any(r.sign for r in model.random):
        assert H is None
        return
    h = 1e-30
    P = len(params)
    steps = np.column_stack([simulated_likelihood_tile(model, tile, params + 1j * h * np.eye(P)[k], chosen,
                                                       batch_bytes=batch)[3].sum(axis=0).imag / h for k in range(P)])
    np.testing.assert_allclose(H, (steps + steps.T) / 2, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(steps).max()))


def _panel_file(path, seed, n=2400, J=3, panel_size=4, sd=0.9):
    """A mixed logit with a normal coefficient on x2 (mean -0.8, sd `sd`) drawn once per decision
    maker of `panel_size` sets; x1, x3 fixed."""
    rng = np.random.default_rng(seed)
    rows = n * J
    X = rng.standard_normal((rows, 3))
    units = np.arange(n) // panel_size
    beta2 = -0.8 + sd * rng.standard_normal(units[-1] + 1)
    u = X[:, 0] * 1.0 + X[:, 1] * np.repeat(beta2[units], J) + X[:, 2] * 0.5
    u = u.reshape(n, J) + rng.gumbel(size=(n, J))
    chosen = np.zeros(rows, dtype=np.int8)
    chosen[np.arange(n) * J + u.argmax(axis=1)] = 1
    dm = X - np.repeat(X[chosen == 1], J, axis=0)
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=np.arange(0, rows + 1, J), chosen=chosen,
                                       panel=units.astype(np.int64)),
                      ["x1", "x2", "x3"], ["z1", "z2", "z3"],
                      truth=[1.0, -0.8, 0.5, sd], truth_names=["x1", "b_x2", "x3", "sd_x2"])
    return path


def test_the_hessian_of_central_differences_is_the_complex_step_of_the_exact_score(tmp_path):
    from estpipe.data.format import read_choice_data

    data = read_choice_data(_panel_file(tmp_path / "p.h5", seed=2, n=600))
    model = get_model("mixed-logit").bind(Facts(3), random="x2,x3:-lognormal", correlated=True, draws=50)
    kernel = PartitionKernel(data, model=model, x_names=["x1", "x2", "x3"])
    b = np.array([0.9, -0.7, -0.6, 0.8, 0.2, 0.4])

    def score(x):
        return kernel.evaluate(Request.for_likelihood(x)).score

    H = hessian(score, b, HESSIAN_STEP * np.maximum(1.0, np.abs(b)))
    h = 1e-30
    exact = np.column_stack([score(b + 1j * h * np.eye(len(b))[k]).imag / h for k in range(len(b))])
    np.testing.assert_allclose(H, (exact + exact.T) / 2, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_a_cross_section_in_linear_scale_is_the_definition(monkeypatch, scale):
    """Every unit one set (no panel): with tame utilities the draws' weights come from the chosen
    probabilities themselves (no log, no exp per draw); scaled up 60 times they are not tame and
    take the log scale. Both are the definition, and the linear path equals the log path (forced
    by TAME_UTILITY = 0) in the loglik, the scores and the exact Hessian."""
    from estpipe.kernel import fused_mixed

    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 6, 40)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    X = scale * rng.standard_normal((offsets[-1], 3))
    chosen_row = offsets[:-1] + rng.integers(0, sizes)
    unit = np.arange(len(sizes))
    model = get_model("mixed-logit").bind(Facts(3, panel=False), random="x1,x3", correlated=True, draws=30,
                                          draws_kind="halton")
    params = np.array([0.5, -0.4, 0.3, 0.6, 0.2, 0.4])
    tile = TileData(X=X, seg=Segments(offsets), alt=None, unit=unit, x_names=tuple(model.x_names))
    chosen = (chosen_row, np.arange(len(sizes)))
    ll, _, _, S, H = simulated_likelihood_tile(model, tile, params, chosen, batch_bytes=2000, hessian=True)
    np.testing.assert_allclose(ll, reference_loglik(model, X, offsets, unit, chosen_row, params).real, rtol=1e-12)
    monkeypatch.setattr(fused_mixed, "TAME_UTILITY", 0.0)
    ll0, _, _, S0, H0 = simulated_likelihood_tile(model, tile, params, chosen, batch_bytes=2000, hessian=True)
    np.testing.assert_allclose(ll, ll0, rtol=1e-13)
    np.testing.assert_allclose(S, S0, rtol=1e-11, atol=1e-12 * np.abs(S0).max())
    np.testing.assert_allclose(H, H0, rtol=1e-10, atol=1e-12 * np.abs(H0).max())


def test_the_kernels_exact_hessian_over_tiles_and_seed_scales(tmp_path):
    """A whole partition (panel units, several tiles on two threads, correlated normals): the
    exact Hessian the likelihood request returns is the complex step of the kernel's score, also
    with a seed scale (partials with respect to beta = scale * params); every sums object says
    whether its kernel has one."""
    from estpipe.data.format import read_choice_data

    data = read_choice_data(_panel_file(tmp_path / "p.h5", seed=4, n=600))
    model = get_model("mixed-logit").bind(Facts(3), random="x2,x3", correlated=True, draws=40)
    kernel = PartitionKernel(data, model=model, x_names=["x1", "x2", "x3"], tile_rows=150, threads=2)
    assert len(kernel.tiles) > 2
    b = np.array([0.9, -0.7, 0.4, 0.8, 0.2, 0.5])
    scale = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    h = 1e-30
    for seed_scale in (None, scale):
        got = kernel.evaluate(Request.for_likelihood(b, seed_scale=seed_scale, score=False, opg=False, hessian=True))
        assert got.has_hessian

        def score(x):
            return kernel.evaluate(Request.for_likelihood(x, seed_scale=seed_scale)).score

        exact = np.column_stack([score(b + 1j * h * np.eye(len(b))[k]).imag / h for k in range(len(b))])
        if seed_scale is not None:
            exact = exact / seed_scale[None, :]
        np.testing.assert_allclose(got.hessian, (exact + exact.T) / 2, rtol=1e-10, atol=1e-10 * np.abs(exact).max())
    lognormal = get_model("mixed-logit").bind(Facts(3), random="x2:lognormal", draws=10)
    other = PartitionKernel(data, model=lognormal, x_names=["x1", "x2", "x3"])
    sums = other.evaluate(Request.for_likelihood(np.array([0.9, -0.7, 0.4, 0.3]), hessian=True))
    assert sums.hessian is None and not sums.has_hessian


def test_with_every_sd_at_zero_it_is_the_logit(tmp_path):
    from estpipe.data.format import read_choice_data

    data = read_choice_data(_panel_file(tmp_path / "p.h5", seed=3, n=300))
    b = np.array([0.7, -0.4, 0.3])
    logit = PartitionKernel(data, model="logit").evaluate(Request.for_likelihood(b))
    for random in ("x1,x2", "x2,x3"):
        model = get_model("mixed-logit").bind(Facts(3), random=random, correlated=True, draws=40)
        mixed = PartitionKernel(data, model=model).evaluate(Request.for_likelihood(np.r_[b, 0.0, 0.0, 0.0]))
        np.testing.assert_allclose(mixed.loglik, logit.loglik, rtol=1e-13)
        # the beta scores are the logit's per decision maker: the same sum; the OPG per unit too
        np.testing.assert_allclose(mixed.score[:3], logit.score, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(mixed.opg[:3, :3], logit.opg, rtol=1e-11, atol=1e-11)
        assert mixed.n_units == logit.n_units == 75


def test_tiles_threads_batches_and_partitions_do_not_change_the_sums(tmp_path, monkeypatch):
    from estpipe.data.format import read_choice_data
    from estpipe.kernel import fused_mixed

    path = _panel_file(tmp_path / "p.h5", seed=4, n=400, panel_size=3)
    data = read_choice_data(path)
    model = get_model("mixed-logit").bind(Facts(3), random="x1,x2:-lognormal", correlated=True, draws=33)
    b = np.array([0.9, -0.3, 0.4, 0.6, -0.2, 0.5])
    base = PartitionKernel(data, model=model, tile_rows=100_000, threads=1).evaluate(Request.for_likelihood(b))
    for tile_rows, threads in ((10, 1), (37, 2), (500, 2)):
        s = PartitionKernel(data, model=model, tile_rows=tile_rows, threads=threads).evaluate(Request.for_likelihood(b))
        np.testing.assert_allclose(s.loglik, base.loglik, rtol=1e-13)
        np.testing.assert_allclose(s.score, base.score, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(s.opg, base.opg, rtol=1e-11, atol=1e-11)
    monkeypatch.setattr(fused_mixed, "BATCH_BYTES", 8 * 50)  # a few draws per batch
    s = PartitionKernel(data, model=model, threads=1).evaluate(Request.for_likelihood(b))
    np.testing.assert_allclose(s.score, base.score, rtol=1e-11, atol=1e-11)
    # partitions that split the file between decision makers 0-1-2 | 3-... (set 4 starts unit 1)
    halves = [read_choice_data(path, 0, 201), read_choice_data(path, 201, 400)]
    parts = [PartitionKernel(h, model=model).evaluate(Request.for_likelihood(b)) for h in halves]
    total = parts[0] + parts[1]
    np.testing.assert_allclose(total.loglik, base.loglik, rtol=1e-13)
    np.testing.assert_allclose(total.opg, base.opg, rtol=1e-11, atol=1e-11)
    assert total.n_units == base.n_units == 134


def _options(**kw):
    return EstimateOptions(model="mixed-logit", random="x2", estimator="mle", draws=kw.pop("draws", 200), **kw)


def test_recovery_in_process_equals_two_workers_and_the_start_is_a_logit_fit(tmp_path):
    path = _panel_file(tmp_path / "p.h5", seed=5, n=2000, panel_size=5)
    lines = []

    class Log:
        def log(self, message):
            lines.append(message)

        def iteration(self, record):
            pass

        def checkpoint(self, state):
            pass

    r = estimate(path, _options(), reporter=Log())
    assert r.converged and r.param_names == ["x1", "b_x2", "x3", "sd_x2"]
    assert any(line.startswith("start: the coefficients of a logit fit") for line in lines), lines
    truth = np.array([1.0, -0.8, 0.5, 0.9])
    z = (r.params - truth) / r.std_errors
    assert np.all(np.abs(z) < 4), z
    d = r.to_dict()
    assert d["se_type"] == "clustered" and d["n_units"] == 400 and d["n_draws"] == 200
    assert d["draws_kind"] == "sobol" and d["units"] == "panel units"
    # planned partitions keep each decision maker's 5 sets together: the same sums, the same run
    w2 = estimate(path, _options(workers=2, partitions=3))
    np.testing.assert_allclose(w2.params, r.params, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(w2.std_errors, r.std_errors, rtol=1e-8)
    np.testing.assert_allclose(w2.loglik, r.loglik, rtol=1e-12)


def test_more_draws_move_the_estimate_less_than_its_standard_error(tmp_path):
    """Five draw seeds at R = 300: the spread of the log-likelihood and of the estimates over
    seeds (the simulation error) is small against the standard errors."""
    path = _panel_file(tmp_path / "p.h5", seed=6, n=1500, panel_size=3)
    runs = [estimate(path, _options(draws=300, draws_seed=s, draws_kind="halton")) for s in range(5)]
    params = np.array([r.params for r in runs])
    assert all(r.converged for r in runs)
    assert np.all(params.std(axis=0) < 0.2 * runs[0].std_errors), params.std(axis=0) / runs[0].std_errors
    lls = np.array([r.loglik for r in runs])
    assert lls.std() < 1.0 and np.ptp(lls) > 0  # different draws, nearly the same likelihood


@pytest.mark.parametrize("sd", [0.9])
def test_inference_over_40_data_sets(tmp_path, sd):
    """95% intervals cover at a binomially consistent rate and the spread of the estimates is
    that of the standard errors, with R = 200 draws per decision maker (bias ~ 1/R, small
    against the standard errors at this size: Train 2009, section 10.5)."""
    truth = np.array([1.0, -0.8, 0.5, sd])
    est, se = [], []
    for seed in range(40):
        r = estimate(_panel_file(tmp_path / f"d{seed}.h5", seed=100 + seed, n=800, panel_size=4, sd=sd),
                     _options(draws=200, draws_seed=seed))
        assert r.converged
        est.append(r.params)
        se.append(r.std_errors)
    coverage, ratio = assert_monte_carlo(est, se, truth)
    print("coverage", coverage, "sd/se", ratio)


def test_a_stalling_polish_hands_over_to_newton_steps(tmp_path):
    """On the modechoice data (210 people, in dollars and minutes) the mixed logit's OPG is far
    from -H: BHHH's polish stops after two slow steps, and Newton steps on the one Hessian
    converge (before the stall rule it spent all 20 polish steps for nothing)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "estpipe", "load", repo / "data" / "modechoice.csv", tmp_path / "mc.h5",
                    "--set-col", "individual", "--choice-col", "choice", "--x", "invc,invt,ttme", "--alt-col", "mode",
                    "--asc"], check=True, capture_output=True)
    r = estimate(tmp_path / "mc.h5", EstimateOptions(model="mixed-logit", random="invt,ttme", estimator="mle",
                                                     draws=100, draws_kind="halton"))
    assert r.converged, r.message
    polish = int(re.search(r"(\d+) BHHH polish steps?", r.message).group(1))
    assert polish < 20 and re.search(r"\d+ Newton steps? on it", r.message), r.message


class _WithoutExactHessian:
    """The same kernel with its exact Hessian withheld: the estimator then takes forward
    differences of the score, the path a lognormal coefficient takes."""

    def __init__(self, kernel):
        self.kernel = kernel

    def evaluate(self, request):
        from dataclasses import replace

        return replace(self.kernel.evaluate(request), hessian=None, has_hessian=False)


def test_the_estimators_exact_hessian_gives_the_forward_differences_errors_in_one_evaluation(tmp_path):
    """The whole estimator on panel data, clustered: with the exact Hessian the estimate, the
    classical and the robust covariance are those of forward differences (which are ~1e-8
    relative), in one Hessian evaluation instead of P, and the message says which."""
    from types import SimpleNamespace

    from estpipe.data.format import read_choice_data
    from estpipe.estimation.mle import MleSettings, estimate_mle

    path = _panel_file(tmp_path / "p.h5", seed=8, n=1200, panel_size=4)
    data = read_choice_data(path)
    model = get_model("mixed-logit").bind(Facts(3), random="x2,x3", correlated=True, draws=60)
    problem = SimpleNamespace(has_chosen=True, x_names=["x1", "x2", "x3"], has_panel=True, path=str(path))
    start = np.r_[0.8, -0.6, 0.4, 0.5, 0.0, 0.5]
    kernel = PartitionKernel(data, model=model, x_names=problem.x_names)
    exact = estimate_mle(kernel, problem, model, MleSettings(), start, clustered=True)
    forward = estimate_mle(_WithoutExactHessian(PartitionKernel(data, model=model, x_names=problem.x_names)),
                           problem, model, MleSettings(), start, clustered=True)
    P = len(start)
    assert exact.converged and forward.converged
    assert exact.hessian_evaluations == 1 and "Hessian (exact) 1 evaluation" in exact.message, exact.message
    assert forward.hessian_evaluations == P and "forward differences" in forward.message
    np.testing.assert_allclose(exact.params, forward.params, rtol=1e-7, atol=1e-8)
    assert set(exact.covariances) == set(forward.covariances) >= {"classical", "clustered"}
    for kind, cov in exact.covariances.items():
        np.testing.assert_allclose(cov, forward.covariances[kind], rtol=1e-5, atol=1e-5 * np.abs(cov).max())
