"""The mixed logit: its fused kernel against its reference (dual operations over the draws),
derivatives against complex step and central differences, the identities with the logit and the
signed logit, draws that depend only on (seed, unit), recovery and inference on simulated data,
and its bad input."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import estimate_error_line
from estpipe.data.format import ChoiceData, write_choice_data
from estpipe.errors import UserError
from estpipe.kernel import PartitionKernel
from estpipe.kernel import fused_mixed
from estpipe.models import get_model
from estpipe.models.draws import Draws
from estpipe.orchestration import EstimateOptions, estimate


class Facts:
    def __init__(self, K, panel=False):
        self.x_names = [f"x{k + 1}" for k in range(K)]
        self.alt_names = None
        self.has_panel = panel


@st.composite
def mixed_problems(draw):
    K = draw(st.integers(2, 4))
    n_random = draw(st.integers(1, K))
    kinds = draw(st.lists(st.sampled_from(["", ":lognormal", ":-lognormal"]), min_size=n_random, max_size=n_random))
    correlated = draw(st.booleans())
    sizes = draw(st.lists(st.integers(1, 5), min_size=2, max_size=10))
    panel_size = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    R = draw(st.integers(1, 40))
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    X = rng.standard_normal((offsets[-1], K))
    dm = rng.standard_normal((offsets[-1], 5))
    panel = np.arange(len(sizes), dtype=np.int64) // panel_size
    random = ",".join(f"x{k + 1}{kind}" for k, kind in zip(range(n_random), kinds))
    model = get_model("mixed-logit").bind(Facts(K, True), random=random, correlated=correlated, draws=R, draws_seed=seed % 97)
    params = rng.uniform(-0.6, 0.6, model.n_params(K))
    return ChoiceData(X=X, dm=dm, offsets=offsets, panel=panel), model, params


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=mixed_problems(), tile_rows=st.integers(3, 40))
def test_fused_equals_reference_and_complex_step(problem, tile_rows):
    data, model, params = problem
    fused = PartitionKernel(data, model=model, tile_rows=tile_rows)
    reference = PartitionKernel(data, model=model, fast=False, tile_rows=tile_rows)
    assert type(fused.strategy).__name__ == "FusedMixed"
    a, r = fused.sums(params, covariance=True), reference.sums(params, covariance=True)
    scale = np.abs(r.gG).max()
    np.testing.assert_allclose(a.gG, r.gG, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(a.hh, r.hh, rtol=1e-12, atol=1e-12 * np.abs(r.hh).max())
    assert a.n_units == r.n_units == len(np.unique(data.panel))
    G = r.G
    h = 1e-30
    step = np.empty_like(G)
    for k in range(len(params)):
        z = params.astype(complex)
        z[k] += 1j * h
        step[:, k] = reference.sums(z, jacobian=False).g.imag / h
    # atol 1e-12 max|G|, or of the terms that cancel when G is 0 exactly (every set of one
    # alternative: the complex step gives 0, the closed form rounding of |dm x|)
    floor = np.abs(data.dm).max() * max(1.0, np.abs(data.X).max())
    np.testing.assert_allclose(G, step, rtol=1e-12, atol=1e-12 * max(np.abs(G).max(), 1e-3 * floor))
    central = np.empty_like(G)
    for k in range(len(params)):
        e = np.zeros(len(params))
        e[k] = 1e-6
        central[:, k] = (fused.sums(params + e, jacobian=False).g - fused.sums(params - e, jacobian=False).g) / 2e-6
    np.testing.assert_allclose(fused.sums(params).G, central, rtol=0, atol=1e-6 * max(1.0, np.abs(G).max()))


def _logit_data(seed=1, n=60, J=4, K=3):
    rng = np.random.default_rng(seed)
    offsets = np.arange(0, n * J + 1, J, dtype=np.int64)
    return ChoiceData(X=rng.standard_normal((n * J, K)), dm=rng.standard_normal((n * J, 5)), offsets=offsets)


def test_with_every_sd_at_zero_it_is_the_logit_and_the_signed_logit():
    data = _logit_data()
    b = np.array([0.4, -0.3, 0.2])
    logit = PartitionKernel(data, model="logit").sums(b)
    normal = get_model("mixed-logit").bind(Facts(3), random="x1,x2", draws=30)
    mixed = PartitionKernel(data, model=normal).sums(np.r_[b, 0.0, 0.0])
    np.testing.assert_allclose(mixed.g, logit.g, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(mixed.G[:, :3], logit.G, rtol=1e-12, atol=1e-14)
    theta = np.array([-0.5, 0.1, -1.2])  # logit-signed: b = -exp(theta)
    signed = PartitionKernel(data, model="logit-signed").sums(theta)
    lognormal = get_model("mixed-logit").bind(Facts(3), random="x1:-lognormal,x2:-lognormal,x3:-lognormal", draws=7)
    mixed = PartitionKernel(data, model=lognormal).sums(np.r_[theta, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(mixed.g, signed.g, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(mixed.G[:, :3], signed.G, rtol=1e-12, atol=1e-14)


def test_tiles_threads_and_draw_batches_do_not_change_the_sums(monkeypatch):
    data = _logit_data(seed=3, n=200)
    data.panel = np.arange(200) // 4
    model = get_model("mixed-logit").bind(Facts(3, True), random="x1,x3:lognormal", correlated=True, draws=64)
    b = np.array([0.4, -0.3, 0.2, 0.5, 0.1, 0.6])
    base = PartitionKernel(data, model=model, tile_rows=10_000, threads=1).sums(b, covariance=True)
    for tile_rows, threads in ((16, 1), (37, 2), (400, 2)):
        s = PartitionKernel(data, model=model, tile_rows=tile_rows, threads=threads).sums(b, covariance=True)
        np.testing.assert_allclose(s.gG, base.gG, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s.hh, base.hh, rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(fused_mixed, "BATCH_BYTES", 8 * 4 * 7 * 4)  # a few draws per batch
    s = PartitionKernel(data, model=model, threads=1).sums(b, covariance=True)
    np.testing.assert_allclose(s.gG, base.gG, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sobol", "halton", "pseudo"])
def test_draws_are_a_function_of_seed_and_unit_and_standard_normal(kind):
    d = Draws(kind, R=512, dims=2, seed=5)
    whole = d.normals(np.arange(50))
    np.testing.assert_array_equal(d.normals(np.array([7, 3]), 100, 300), whole[[7, 3], 100:300])
    many = Draws(kind, R=512, dims=2, seed=5).normals(np.arange(2000))
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1) < 0.01
    # units' simulated means are independent: their correlation across units is that of noise
    unit_means = Draws(kind, R=16, dims=1, seed=1).normals(np.arange(4000))[:, :, 0].mean(axis=1)
    assert abs(np.corrcoef(unit_means[:-1], unit_means[1:])[0, 1]) < 0.06
    assert not np.array_equal(Draws(kind, R=16, dims=1, seed=2).normals(np.arange(3)), d.normals(np.arange(3))[:, :16, :1])


# -- simulated data: recovery, inference ---------------------------------------------------------------

TRUE = {"x1": 1.0, "b_x2": -0.8, "x3": 0.5, "sd_x2": 0.9}


def _simulate(path, seed, n=3000, J=4, panel_size=1):
    """A mixed logit with a normal coefficient on x2 (mean -0.8, sd 0.9), one draw per decision
    maker; instruments x, x2^2 - 1, x1 x2, x2 x3 (they identify the variance)."""
    rng = np.random.default_rng(seed)
    rows = n * J
    X = rng.standard_normal((rows, 3))
    units = np.arange(n) // panel_size
    beta2 = TRUE["b_x2"] + TRUE["sd_x2"] * rng.standard_normal(units[-1] + 1)
    u = X[:, 0] * TRUE["x1"] + X[:, 1] * np.repeat(beta2[units], J) + X[:, 2] * TRUE["x3"]
    u = u.reshape(n, J) + rng.gumbel(size=(n, J))
    chosen = np.zeros(rows, dtype=np.int8)
    chosen[np.arange(n) * J + u.argmax(axis=1)] = 1
    Z = np.column_stack([X, X[:, 1] ** 2 - 1, X[:, 0] * X[:, 1], X[:, 1] * X[:, 2]])
    dm = Z - np.repeat(Z[chosen == 1], J, axis=0)
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=np.arange(0, rows + 1, J), chosen=chosen),
                      ["x1", "x2", "x3"], ["z1", "z2", "z3", "z2sq", "z12", "z23"])
    return path


def _mixed(**kw):
    return EstimateOptions(model="mixed-logit", random="x2", draws=kw.pop("draws", 100), **kw)


def test_recovers_the_truth_and_reports_abs_sd(tmp_path):
    r = estimate(_simulate(tmp_path / "m.h5", seed=11), _mixed())
    assert r.converged and r.param_names == list(TRUE)
    z = (r.params - np.array(list(TRUE.values()))) / r.std_errors
    assert np.all(np.abs(z) < 4), z
    assert r.params[3] > 0
    # from sd < 0 it converges to the mirror image, reported with |sd| (the draws are not symmetric,
    # so the two solutions differ by simulation error: far within a standard error)
    flipped = estimate(tmp_path / "m.h5", _mixed(start=[1.0, -0.8, 0.5, -0.9]))
    assert flipped.converged and flipped.params[3] > 0
    assert np.all(np.abs(flipped.params - r.params) < 0.1 * r.std_errors)


def test_inference_over_40_data_sets(tmp_path):
    """95% intervals cover at a binomially consistent rate and the spread of the estimates
    matches the mean standard error, for every parameter."""
    estimates, ses = [], []
    for seed in range(40):
        r = estimate(_simulate(tmp_path / f"m{seed}.h5", seed=100 + seed, n=1500), _mixed(draws=50))
        assert r.converged
        estimates.append(r.params)
        ses.append(r.std_errors)
    estimates, ses = np.array(estimates), np.array(ses)
    truth = np.array(list(TRUE.values()))
    cover = (np.abs(estimates - truth) <= 1.96 * ses).mean(axis=0)
    # 40 draws of a 95% coverage: below 0.80 has probability < 0.1% per parameter
    assert np.all(cover >= 0.80), cover
    ratio = estimates.std(axis=0, ddof=1) / ses.mean(axis=0)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio


def test_estimates_across_draw_seeds_vary_within_their_standard_errors(tmp_path):
    """The data fixed, R = 10: the estimates move with the draws, by less than their standard
    errors allow (the simulation variance is part of S)."""
    path = _simulate(tmp_path / "m.h5", seed=3, n=2000)
    runs = [estimate(path, _mixed(draws=10, draws_seed=s)) for s in range(6)]
    params = np.array([r.params for r in runs])
    se = np.array([r.std_errors for r in runs]).mean(axis=0)
    assert np.all(params.std(axis=0, ddof=1) < se), (params.std(axis=0), se)
    assert np.all(params.std(axis=0) > 0)


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    pytest.param(["--random", "x9"], "--random: 'x9' is not a column of x", id="random-not-in-x"),
    pytest.param(["--random", "x2:weibull"], "is not normal, lognormal or -lognormal", id="random-unknown-kind"),
    pytest.param(["--random", "x2", "--draws", "0"], "--draws", id="zero-draws"),
    pytest.param(["--random", "x2", "--panel"], "estpipe load --panel-col", id="panel-without-panel-ids"),
    pytest.param([], "needs --random", id="no-random"),
    pytest.param(["--random", "x2", "--draws-kind", "sobl"], "did you mean 'sobol'", id="draws-kind"),
    pytest.param(["--model", "logit", "--random", "x2"], "model logit takes no --random", id="random-for-logit"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    path = _simulate(tmp_path / "m.h5", seed=1, n=300)
    assert expected in estimate_error_line(path, args, "mixed-logit")


def test_refused_when_the_moments_cannot_identify_the_variances(tmp_path):
    rng = np.random.default_rng(0)
    n, J = 300, 3
    X = rng.standard_normal((n * J, 2))
    chosen = np.zeros(n * J, dtype=np.int8)
    chosen[np.arange(n) * J] = 1
    dm = X - np.repeat(X[chosen == 1], J, axis=0)
    path = tmp_path / "mk.h5"
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=np.arange(0, n * J + 1, J), chosen=chosen), ["a", "b"], ["a", "b"])
    with pytest.raises(UserError, match="squares and interactions of the random x"):
        estimate(path, EstimateOptions(model="mixed-logit", random="b"))


def test_partition_keys_and_checkpoints_name_the_draws(tmp_path):
    """A long-lived cluster keys its resident kernels by everything that changes their sums: other
    draws (kind, R, seed) give other keys, and a checkpoint of other draws is refused."""
    from estpipe.execution.tasks import PartitionSource
    from estpipe.models.spec import ModelSpec

    class P:
        path, fingerprint = "/data.h5", "abc"

    keys = {PartitionSource.of(P, ModelSpec.of("mixed-logit", **{"random": "x2", **kw}), "dual").key(0, 10)
            for kw in ({}, {"draws": 500}, {"draws_seed": 1}, {"draws_kind": "halton"}, {"random": "x1"})}
    assert len(keys) == 5
    path = _simulate(tmp_path / "m.h5", seed=2, n=400)
    ckpt = tmp_path / "run.ckpt"
    estimate(path, _mixed(draws=20, checkpoint=str(ckpt), steps=1))
    with pytest.raises(UserError, match="other options .*draws_seed was None, now 3"):
        estimate(path, _mixed(draws=20, draws_seed=3, checkpoint=str(ckpt), resume=True, steps=1))
