"""Estimates do not depend on the data's units (issue: identification must not depend on units).

Rescaling a column of X by any factor, when the moments do not change with it (dm given) or the
model is just identified (M = K), changes only that parameter's estimate and standard error, by
the inverse factor, for every optimizer and derivative mode; with M > K and the instruments
rescaled too, step 1 (W = I) changes, but the verdict does not. The shipped modechoice data in its
natural units (dollars, minutes) estimates; a model that is not identified names the columns
that are collinear and why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estpipe.data.format import ChoiceData, read_choice_data, write_choice_data
from estpipe.errors import UserError
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.estimation.linalg import minimal_dependent_columns, relative_singular_values
from estpipe.kernel import PartitionKernel
from estpipe.data.simulate import simulate_choice_data

MODES = [
    pytest.param("gauss-newton", "dual", 1e-8, id="gauss-newton-dual"),
    pytest.param("bfgs", "dual", 1e-8, id="bfgs-dual"),
    pytest.param("l-bfgs-b", "dual", 1e-8, id="lbfgsb-dual"),
    pytest.param("bfgs", "adjoint", 1e-8, id="bfgs-adjoint"),
    pytest.param("l-bfgs-b", "adjoint", 1e-8, id="lbfgsb-adjoint"),
    pytest.param("gauss-newton", "fd", 1e-6, id="gauss-newton-fd"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("units")
    path = folder / "base.h5"
    simulate_choice_data(path, sets=400, alternatives=(4, 4), params=3, moments=6, seed=3)
    return folder, read_choice_data(path)


def _write(path, data: ChoiceData, X, dm):
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=data.offsets, chosen=data.chosen),
                      ["price", "time", "comfort"], [f"z{m + 1}" for m in range(dm.shape[1])],
                      provenance={"command": "test"})


def _dm_from(X, data):
    """dm = z - z_chosen with z = X (M = K)."""
    chosen = np.flatnonzero(data.chosen)
    return X - np.repeat(X[chosen], np.diff(data.offsets), axis=0)


_reference: dict = {}


def _estimate(path, optimizer, derivatives):
    return estimate(path, EstimateOptions(optimizer=optimizer, derivatives=derivatives))


@pytest.mark.parametrize(("optimizer", "derivatives", "rtol"), MODES)
@pytest.mark.parametrize("moments", ["dm-given", "just-identified"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_factor=st.floats(-6, 6), column=st.integers(0, 2))
def test_rescaling_a_column_rescales_only_its_parameter(base, optimizer, derivatives, rtol, moments, log_factor, column):
    folder, data = base
    f = 10.0**log_factor
    X = data.X.copy()
    X[:, column] *= f
    if moments == "dm-given":
        dm0, dm1 = data.dm, data.dm
    else:
        dm0, dm1 = _dm_from(data.X, data), _dm_from(X, data)
    key = (moments, optimizer, derivatives)
    if key not in _reference:
        _write(folder / f"ref-{moments}.h5", data, data.X, dm0)
        _reference[key] = _estimate(folder / f"ref-{moments}.h5", optimizer, derivatives)
    ref = _reference[key]
    path = folder / f"scaled-{moments}.h5"
    _write(path, data, X, dm1)
    r = _estimate(path, optimizer, derivatives)
    assert r.converged == ref.converged and r.converged, (r.message, ref.message)
    back = np.ones(3)
    back[column] = f
    np.testing.assert_allclose(r.params * back, ref.params, rtol=rtol)
    np.testing.assert_allclose(r.std_errors * back, ref.std_errors, rtol=rtol)
    if moments == "dm-given":  # the same objective function of theta, so the same minimum
        np.testing.assert_allclose(r.objective, ref.objective, rtol=1e-6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_factor=st.floats(-6, 6), column=st.integers(0, 2))
def test_instruments_rescaled_too_keep_the_verdict(base, log_factor, column):
    """M > K and the instrument built from the column rescaled with it: step 1 (W = I) weighs the
    moments differently, so the estimate moves within its standard error; converged and
    identified it stays."""
    folder, data = base
    f = 10.0**log_factor
    X = data.X.copy()
    X[:, column] *= f
    dm = data.dm.copy()
    dm[:, column] *= f  # the logit design's z starts with the x columns
    path = folder / "instruments.h5"
    _write(path, data, X, dm)
    r = estimate(path, EstimateOptions())
    ref = _reference.get("two-step") or estimate(_ref_file(folder, data), EstimateOptions())
    _reference["two-step"] = ref
    assert r.converged and ref.converged
    back = np.ones(3)
    back[column] = f
    # two-step GMM is efficient whatever step 1's weight: the estimates differ by much less than 1 se
    assert np.all(np.abs(r.params * back - ref.params) < 0.5 * ref.std_errors)
    assert r.j_df == ref.j_df == 3


def _ref_file(folder, data):
    path = folder / "ref-two-step.h5"
    _write(path, data, data.X, data.dm)
    return path


def test_columns_near_1e150_estimate_like_any_unit(base):
    """x in units near 1e150 and z = x (so dm and the Jacobian are near 1e150 and 1e300 before
    scaling): the same estimate, scaled, as in ordinary units."""
    folder, data = base
    X = data.X.copy()
    X[:, 0] *= 1e150
    X[:, 2] *= 3e-140
    _write(folder / "ref-huge.h5", data, data.X, _dm_from(data.X, data))
    _write(folder / "huge.h5", data, X, _dm_from(X, data))
    ref = estimate(folder / "ref-huge.h5", EstimateOptions())
    r = estimate(folder / "huge.h5", EstimateOptions())
    assert r.converged
    back = np.array([1e150, 1.0, 3e-140])
    np.testing.assert_allclose(r.params * back, ref.params, rtol=1e-8)
    np.testing.assert_allclose(r.std_errors * back, ref.std_errors, rtol=1e-8)


# -- the shipped data in its natural units -----------------------------------------------------------

def _modechoice(tmp_path, scale_cost=1.0, scale_time=1.0):
    import pandas as pd

    from estpipe.data.load import load_choice_data

    df = pd.read_csv(Path(__file__).parents[1] / "data" / "modechoice.csv")
    df["invc"] = df["invc"] * scale_cost
    df["invt"] = df["invt"] * scale_time
    csv = tmp_path / f"mc-{scale_cost}-{scale_time}.csv"
    df.to_csv(csv, index=False)
    out = tmp_path / f"mc-{scale_cost}-{scale_time}.h5"
    load_choice_data(csv, out, set_col="individual", choice_col="choice", x="invc,invt,ttme", alt_col="mode", asc=True)
    return out, df


def test_modechoice_in_dollars_and_minutes_estimates(tmp_path):
    """The issue's own example: refused before ('G'WG ... singular'), now it converges, equals
    the conditional logit MLE (statsmodels), and in cents and hours gives the same model."""
    from statsmodels.discrete.conditional_models import ConditionalLogit

    path, df = _modechoice(tmp_path)
    r = estimate(path, EstimateOptions())
    assert r.converged and r.param_names == ["invc", "invt", "ttme", "asc_2", "asc_3", "asc_4"]
    exog = np.column_stack([df[["invc", "invt", "ttme"]].to_numpy(float)] +
                           [(df["mode"] == m).to_numpy(float) for m in (2, 3, 4)])
    mle = ConditionalLogit(df["choice"].to_numpy(), exog, groups=df["individual"].to_numpy()).fit(
        method="newton", maxiter=100, gtol=1e-12, disp=False)
    np.testing.assert_allclose(r.params, mle.params, rtol=1e-6)
    assert np.all(np.abs(np.asarray(r.params[:3]) / r.std_errors[:3]) > 1.9)
    cents_hours, _ = _modechoice(tmp_path, scale_cost=100.0, scale_time=1 / 60)
    s = estimate(cents_hours, EstimateOptions())
    back = np.array([100.0, 1 / 60, 1, 1, 1, 1])
    np.testing.assert_allclose(s.params * back, r.params, rtol=1e-8)
    np.testing.assert_allclose(s.std_errors * back, r.std_errors, rtol=1e-8)


# -- models that really are not identified -----------------------------------------------------------

def _collinear(tmp_path, rng, instruments_only=False):
    n, J = 300, 4
    offsets = np.arange(0, n * J + 1, J)
    X = rng.standard_normal((n * J, 6)) * np.array([1, 1e3, 1e-3, 1, 50, 1])
    chosen = np.zeros(n * J, dtype=np.int8)
    chosen[offsets[:-1] + rng.integers(0, J, n)] = 1
    if instruments_only:
        # X is fine, but every instrument is orthogonal, within sets, to dev(b) - 2e6 dev(c): at the
        # start (equal probabilities) the moments move with b and c only through b + 2e6 c
        Z = np.column_stack([X, X[:, 0] ** 2, X[:, 3] * X[:, 5]])
        dm = Z - np.repeat(Z[chosen == 1], J, axis=0)
        dev = X - np.repeat(X.reshape(n, J, 6).mean(axis=1), J, axis=0)
        u = dev[:, 1] - 2e6 * dev[:, 2]
        dm = dm - np.outer(u, u @ dm) / (u @ u)
    else:
        X[:, 4] = 3.0 * X[:, 1] - 7.0 * X[:, 2] + np.repeat(rng.standard_normal(n), J)  # + a constant per set
        Z = np.column_stack([X, X[:, 0] ** 2])
        dm = Z - np.repeat(Z[chosen == 1], J, axis=0)
    path = tmp_path / "collinear.h5"
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen),
                      ["a", "b", "c", "d", "e", "f"], [f"z{m}" for m in range(dm.shape[1])])
    return path


def test_collinear_columns_are_named_and_only_they(tmp_path):
    path = _collinear(tmp_path, np.random.default_rng(1))
    with pytest.raises(UserError) as err:
        estimate(path, EstimateOptions())
    text = str(err.value)
    assert "not identified at the start: b, c, e are collinear within sets: in every set c = 0.429 b - 0.143 e" in text, text


def test_instruments_that_cannot_tell_columns_apart_say_so(tmp_path):
    path = _collinear(tmp_path, np.random.default_rng(2), instruments_only=True)
    with pytest.raises(UserError) as err:
        estimate(path, EstimateOptions())
    text = str(err.value)
    assert "b, c are not collinear in the data, but the moments cannot tell them apart" in text, text


# -- the numerical parts on their own ------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), P=st.integers(3, 8), size=st.integers(2, 3), log_scales=st.lists(
    st.floats(-8, 8), min_size=8, max_size=8))
def test_minimal_dependent_columns_finds_a_planted_circuit(seed, P, size, log_scales):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((12, P))
    members = sorted(rng.choice(P, size=size, replace=False).tolist())
    coefficients = rng.uniform(0.5, 2, size - 1) * rng.choice([-1, 1], size - 1)
    A[:, members[-1]] = A[:, members[:-1]] @ coefficients
    A = A * 10.0 ** np.array(log_scales[:P])
    found = minimal_dependent_columns(A)
    assert found is not None and found[0] == members
    cols, v = found
    assert np.linalg.norm(A[:, cols] @ v) <= 1e-8 * np.linalg.norm(A[:, cols], axis=0) @ np.abs(v)
    A[:, members[-1]] += 1e-3 * np.linalg.norm(A[:, members[-1]]) * rng.standard_normal(12) / np.sqrt(12)
    assert minimal_dependent_columns(A) is None
    assert relative_singular_values(A)[-1] > 1e-9


@pytest.mark.parametrize("fast", [pytest.param(True, id="fused"), pytest.param(False, id="generic")])
@pytest.mark.parametrize("derivatives", ["dual", "fd", "adjoint"])
def test_kernel_seed_and_moment_scales(base, fast, derivatives):
    """Partials with a seed scale s are dh/db / s; covariance sums with a moment scale R are of
    R h (S_scaled = R S R); the pullback carries the same seed scale."""
    _, data = base
    k = PartitionKernel(data, derivatives=derivatives, fast=fast, tile_rows=300)
    b = np.array([0.3, -0.2, 0.5])
    s = np.array([2.0**-20, 4.0, 2.0**30])
    R = np.array([2.0**-3, 1.0, 2.0**10, 0.5, 2.0**-40, 8.0])
    plain = k.sums(b, covariance=True)
    scaled = k.sums(b, covariance=True, seed_scale=s, moment_scale=R)
    rtol = 1e-12 if derivatives != "fd" else 1e-6
    np.testing.assert_allclose(scaled.G, plain.G / s, rtol=rtol, atol=1e-12 * np.abs(plain.G / s).max())
    np.testing.assert_allclose(scaled.S_scaled, plain.S * np.outer(R, R), rtol=1e-10)
    np.testing.assert_allclose(scaled.S, plain.S, rtol=1e-10)
    v = np.linspace(-1, 1, 6)
    np.testing.assert_allclose(k.pullback(b, v, seed_scale=s), k.pullback(b, v) / s, rtol=rtol)
