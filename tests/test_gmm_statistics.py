"""GMM estimates and inference on data with a known answer: recovery of the truth, interval
coverage, the J test under correct and wrong specification, and agreement with an independent
conditional logit MLE (statsmodels) when just-identified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from estpipe.data.format import ChoiceData, write_choice_data
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.data.simulate import simulate_choice_data

REPO = Path(__file__).resolve().parents[1]


def logit_draws(rng, n_sets, J, X, utility):
    """Chosen (rows,) int8: one draw per set from softmax(utility) with equal set sizes J."""
    u = utility.reshape(n_sets, J)
    p = np.exp(u - u.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    pick = (rng.random((n_sets, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    chosen = np.zeros((n_sets, J), dtype=np.int8)
    chosen[np.arange(n_sets), pick] = 1
    return chosen.ravel()


def differences_from_chosen(z, chosen, n_sets, J):
    """dm = z - z_chosen per set: (rows, M)."""
    Z = z.reshape(n_sets, J, -1)
    zc = (Z * chosen.reshape(n_sets, J, 1)).sum(axis=1, keepdims=True)
    return (Z - zc).reshape(n_sets * J, -1)


def write_equal_sets(path, X, dm, chosen, n_sets, J, truth=None, x_names=None):
    offsets = np.arange(n_sets + 1, dtype=np.int64) * J
    K, M = X.shape[1], dm.shape[1]
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen),
                      x_names or [f"x{k + 1}" for k in range(K)], [f"z{m + 1}" for m in range(M)],
                      provenance={"command": "test"}, truth=truth)


@pytest.fixture(scope="module")
def logit_20k(tmp_path_factory):
    path = tmp_path_factory.mktemp("logit") / "logit20k.h5"
    simulate_choice_data(path, sets=20_000, alternatives=(5, 5), params=4, moments=8, seed=11)
    return path


def test_two_step_recovers_truth_and_j_does_not_reject(logit_20k):
    r = estimate(logit_20k, EstimateOptions())
    assert r.converged
    assert r.truth is not None
    dev = np.abs(r.params - r.truth) / r.std_errors
    assert np.all(dev < 4), dict(zip(r.param_names, dev))
    assert r.j_df == 8 - 4
    assert r.j_pvalue > 0.01, r.j_statistic
    # the standard errors are of the right size: sqrt(n) * se is O(1), not 0 or huge
    assert np.all((r.std_errors > 1e-3) & (r.std_errors < 0.1))


@pytest.mark.slow
def test_intervals_cover_truth_at_95_percent(tmp_path):
    """40 data sets x 3 parameters, one-step and two-step: the 95% intervals cover the truth at a
    rate a Binomial(120, 0.95) makes plausible (two-sided, 0.1% each side), and the standard
    errors match the spread of the estimates across data sets (too wide intervals fail too)."""
    n_data, K = 40, 3
    hits = {1: 0, 2: 0}
    errors = {1: [], 2: []}
    ses = {1: [], 2: []}
    for seed in range(n_data):
        path = tmp_path / f"cov{seed}.h5"
        simulate_choice_data(path, sets=1500, alternatives=(4, 4), params=K, moments=6, seed=1000 + seed)
        for steps in (1, 2):
            r = estimate(path, EstimateOptions(steps=steps, tol=1e-8))
            assert r.converged
            d = r.to_dict()
            hits[steps] += int(np.sum((np.array(d["ci95_lower"]) <= r.truth) & (r.truth <= np.array(d["ci95_upper"]))))
            errors[steps].append(r.params - r.truth)
            ses[steps].append(r.std_errors)
        path.unlink()
    n = n_data * K
    lo, hi = stats.binom.ppf(0.001, n, 0.95), stats.binom.isf(0.001, n, 0.95)
    for steps in (1, 2):
        assert lo <= hits[steps] <= hi, f"{steps}-step coverage {hits[steps]}/{n} outside [{lo}, {hi}]"
        # the spread of 40 estimates is known to about +-11%; a 1.35 factor is > 3 of those
        ratio = np.std(errors[steps]) / np.sqrt(np.mean(np.square(ses[steps])))
        assert 1 / 1.35 < ratio < 1.35, f"{steps}-step: sd(estimates) / se = {ratio:.3f}"


def test_misspecified_model_makes_j_reject(tmp_path):
    """Utility has an omitted term w; instrument z3 is correlated with w, so E[g(b)] != 0 for z3."""
    rng = np.random.default_rng(5)
    n, J = 6000, 5
    X = rng.standard_normal((n * J, 2))
    w = rng.standard_normal(n * J)
    z3 = w + 0.5 * rng.standard_normal(n * J)
    chosen = logit_draws(rng, n, J, X, X @ np.array([1.0, -1.0]) + 1.5 * w)
    z = np.column_stack([X, z3, X[:, 0] ** 2 - 1])
    path = tmp_path / "misspecified.h5"
    write_equal_sets(path, X, differences_from_chosen(z, chosen, n, J), chosen, n, J)
    r = estimate(path, EstimateOptions())
    assert r.j_df == 2
    assert r.j_pvalue < 1e-6, r.j_statistic


def _statsmodels_mle(X, chosen, groups):
    """ConditionalLogit MLE (newton) and the robust sandwich built from its per-group scores."""
    from statsmodels.discrete.conditional_models import ConditionalLogit

    model = ConditionalLogit(chosen.astype(float), X, groups=groups)
    fit = model.fit(method="newton", disp=False, maxiter=100, tol=1e-14)
    b = np.asarray(fit.params)
    scores = np.array([model.score_grp(g, b) for g in range(len(model._endog_grp))])
    bread = np.asarray(fit.cov_params())  # (-H)^-1
    robust = bread @ (scores.T @ scores) @ bread
    return b, np.sqrt(np.diag(robust)), fit


def test_just_identified_equals_conditional_logit_mle(tmp_path):
    rng = np.random.default_rng(3)
    n, J = 2000, 4
    X = rng.standard_normal((n * J, 3))
    chosen = logit_draws(rng, n, J, X, X @ np.array([0.8, -0.5, 0.3]))
    path = tmp_path / "justid.h5"
    write_equal_sets(path, X, differences_from_chosen(X, chosen, n, J), chosen, n, J)
    groups = np.repeat(np.arange(n), J)
    b_mle, se_robust, fit = _statsmodels_mle(X, chosen, groups)
    for steps in (1, 2):
        r = estimate(path, EstimateOptions(steps=steps))
        assert r.converged
        np.testing.assert_allclose(r.params, b_mle, rtol=1e-6)
        np.testing.assert_allclose(r.std_errors, se_robust, rtol=1e-5)
        assert r.j_statistic is None and r.j_df is None
        np.testing.assert_allclose(r.loglik, fit.llf, rtol=1e-10)
    # the non-robust inverse Hessian differs from the sandwich: the test can tell them apart
    assert not np.allclose(np.asarray(fit.bse), se_robust, rtol=1e-3)


def test_modechoice_matches_conditional_logit_mle(tmp_path):
    df = pd.read_csv(REPO / "data" / "modechoice.csv").sort_values(["individual", "mode"])
    sizes = df.groupby("individual", sort=True).size().to_numpy()
    ascs = np.column_stack([(df["mode"] == m).to_numpy(float) for m in (2, 3, 4)])
    X = np.column_stack([df["gc"].to_numpy(float), df["ttme"].to_numpy(float), ascs])
    chosen = df["choice"].to_numpy(np.int8)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    set_of_row = np.repeat(np.arange(len(sizes)), sizes)
    zc = np.zeros((len(sizes), X.shape[1]))
    np.add.at(zc, set_of_row, X * chosen[:, None])
    dm = X - zc[set_of_row]
    names = ["gc", "ttme", "asc_2", "asc_3", "asc_4"]
    path = tmp_path / "modechoice.h5"
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen), names, names,
                      provenance={"command": "test"})
    b_mle, se_robust, fit = _statsmodels_mle(X, chosen, df["individual"].to_numpy())
    r = estimate(path, EstimateOptions())
    assert r.converged and r.param_names == names
    np.testing.assert_allclose(r.params, b_mle, rtol=1e-6)
    np.testing.assert_allclose(r.std_errors, se_robust, rtol=1e-5)
    np.testing.assert_allclose(r.loglik, fit.llf, rtol=1e-10)
