"""`estpipe.data.simulate`: reproducibility across chunk sizes, choices drawn from the true logit,
set sizes, instruments, clusters, refused options, and no partial file on failure."""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest
from scipy import stats

import estpipe.data.simulate as simulate_module
from estpipe.data.format import ChoiceDataFile
from estpipe.errors import UserError, cli_flag, vocabulary
from estpipe.data.simulate import CLUSTER_SHOCK_SD, TRUTH_UTILITY_SD, simulate_choice_data


def _datasets(path) -> dict[str, bytes]:
    """Every dataset of a file as raw bytes (byte equality, not numeric closeness)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return out


def _logit_probabilities(X, offsets, b):
    """s: (n_rows,) softmax of X b within each set; set id per row (n_rows,)."""
    sizes = np.diff(offsets)
    set_id = np.repeat(np.arange(len(sizes)), sizes)
    u = X @ b
    e = np.exp(u - np.maximum.reduceat(u, offsets[:-1])[set_id])
    return e / np.add.reduceat(e, offsets[:-1])[set_id], set_id


def score_statistic(data, b) -> float:
    """The logit score test of b: per-set scores sum_j (y_ij - s_ij) x_ij, (n, K); s' V^-1 s is
    chi-squared with K degrees of freedom when the choices follow the logit at b."""
    s, _ = _logit_probabilities(data.X, data.offsets, b)
    per_set = np.add.reduceat((data.chosen - s)[:, None] * data.X, data.offsets[:-1])
    total = per_set.sum(axis=0)
    return float(total @ np.linalg.solve(per_set.T @ per_set, total))


def calibration_statistic(data, b, bins: int = 10) -> float:
    """Rows binned by their logit probability at b (deciles): sum over bins of
    (chosen - expected)^2 / sum s(1-s). About chi-squared(bins) when the probabilities are right;
    conservative, since the rows of a set are negatively correlated."""
    s, _ = _logit_probabilities(data.X, data.offsets, b)
    edges = np.quantile(s, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    observed = np.bincount(idx, data.chosen, bins)
    expected = np.bincount(idx, s, bins)
    variance = np.bincount(idx, s * (1 - s), bins)
    return float(((observed - expected) ** 2 / variance).sum())


# -- reproducibility ----------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [pytest.param(True, id="prefetch"), pytest.param(False, id="in-turn")])
@pytest.mark.parametrize(
    "design, alternatives, cluster_size",
    [
        pytest.param("logit", (2, 6), 7, id="logit-variable-clustered"),
        pytest.param("logit", (5, 5), None, id="logit-fixed"),
        pytest.param("seed", (3, 4), None, id="seed-design"),
    ],
)
def test_same_seed_gives_byte_equal_arrays_whatever_the_chunk_size(tmp_path, monkeypatch, prefetch, design, alternatives, cluster_size):
    kw = dict(design=design, sets=600, alternatives=alternatives, params=3, moments=8, seed=5, cluster_size=cluster_size)
    # The reference: one chunk, drawn in turn; the chunked runs draw in turn or in a thread.
    monkeypatch.setattr(simulate_module, "PREFETCH", False)
    whole = simulate_choice_data(tmp_path / "whole.h5", chunk_sets=600, **kw)
    assert whole.chunks == 1
    reference = _datasets(tmp_path / "whole.h5")
    monkeypatch.setattr(simulate_module, "PREFETCH", prefetch)
    assert {"X", "dm", "offsets"} <= set(reference)
    for chunk_sets in (64, 37, 1):
        summary = simulate_choice_data(tmp_path / f"c{chunk_sets}.h5", chunk_sets=chunk_sets, **kw)
        assert summary.chunks == -(-600 // chunk_sets) > 1
        assert _datasets(tmp_path / f"c{chunk_sets}.h5") == reference, f"chunk_sets={chunk_sets}"


def test_another_seed_gives_other_arrays(tmp_path):
    kw = dict(sets=50, alternatives=(3, 3), params=2, moments=2)
    simulate_choice_data(tmp_path / "a.h5", seed=1, **kw)
    simulate_choice_data(tmp_path / "b.h5", seed=2, **kw)
    a, b = _datasets(tmp_path / "a.h5"), _datasets(tmp_path / "b.h5")
    assert a["X"] != b["X"] and a["truth/params"] != b["truth/params"]
    assert a["offsets"] == b["offsets"]


# -- the logit design -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[pytest.param((2, 6), id="sizes-2-6"), pytest.param((4, 4), id="size-4")])
def logit_data(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("logit") / "logit.h5"
    simulate_choice_data(path, sets=20_000, alternatives=request.param, params=3, moments=9, seed=3)
    with ChoiceDataFile(path) as f:
        return f.read_sets(), f.truth, f


def test_choices_follow_the_logit_of_the_true_parameters(logit_data):
    data, truth, _ = logit_data
    K = len(truth)
    assert np.array_equal(np.add.reduceat(data.chosen.astype(np.int64), data.offsets[:-1]), np.ones(data.n_sets))
    # Bounds at the 1e-4 tail: the true parameters pass them...
    score_bound = stats.chi2.ppf(1 - 1e-4, K)
    calibration_bound = stats.chi2.ppf(1 - 1e-4, 10)
    assert score_statistic(data, truth) < score_bound
    assert calibration_statistic(data, truth) < calibration_bound
    # ...and probabilities 10% off in the utilities' scale, or with one coefficient moved, do not.
    assert score_statistic(data, truth * 1.1) > score_bound
    assert calibration_statistic(data, truth * 1.1) > calibration_bound
    moved = truth.copy()
    moved[np.argmax(np.abs(truth))] += 0.15
    assert score_statistic(data, moved) > score_bound


def test_true_parameters_give_utilities_of_the_documented_scale(logit_data):
    data, truth, _ = logit_data
    assert np.linalg.norm(truth) == pytest.approx(TRUTH_UTILITY_SD)
    assert np.std(data.X @ truth) == pytest.approx(TRUTH_UTILITY_SD, rel=0.02)


def _instrument(X, name):
    """The instrument a moment name documents, from X (rows, K), evaluated independently."""
    col = lambda k: X[:, int(k) - 1]  # noqa: E731
    if m := re.fullmatch(r"x(\d+)", name):
        return col(m[1])
    if m := re.fullmatch(r"x(\d+)\^2-1", name):
        return col(m[1]) ** 2 - 1
    if m := re.fullmatch(r"x(\d+)\*x(\d+)", name):
        return col(m[1]) * col(m[2])
    if m := re.fullmatch(r"x(\d+)\^3-3\*x(\d+)", name):
        assert m[1] == m[2]
        return col(m[1]) ** 3 - 3 * col(m[1])
    raise AssertionError(f"undocumented moment name {name!r}")


def test_dm_is_the_named_instruments_minus_those_of_the_chosen_row(logit_data):
    data, _, f = logit_data
    assert f.param_names == ["x1", "x2", "x3"]
    assert f.moment_names == ["x1", "x2", "x3", "x1^2-1", "x2^2-1", "x3^2-1", "x1*x2", "x1*x3", "x2*x3"]
    z = np.column_stack([_instrument(data.X, name) for name in f.moment_names])
    sizes = np.diff(data.offsets)
    z_chosen = z[data.chosen == 1]
    np.testing.assert_allclose(data.dm, z - np.repeat(z_chosen, sizes, axis=0), rtol=0, atol=1e-12)


def test_all_instrument_kinds_in_order(tmp_path):
    path = tmp_path / "z.h5"
    simulate_choice_data(path, sets=30, alternatives=(3, 3), params=3, moments=12, seed=0)
    with ChoiceDataFile(path) as f:
        data = f.read_sets()
        names = f.moment_names
    assert names[9:] == ["x1^3-3*x1", "x2^3-3*x2", "x3^3-3*x3"]
    z = np.column_stack([_instrument(data.X, n) for n in names])
    np.testing.assert_allclose(data.dm, z - np.repeat(z[data.chosen == 1], 3, axis=0), atol=1e-12)


def test_variable_set_sizes_fill_the_asked_range(tmp_path):
    path = tmp_path / "v.h5"
    simulate_choice_data(path, sets=3000, alternatives=(2, 9), params=2, moments=2, seed=0, chunk_sets=500)
    with ChoiceDataFile(path) as f:
        sizes = np.diff(f.offsets)
    assert sizes.min() == 2 and sizes.max() == 9
    counts = np.bincount(sizes, minlength=10)[2:]
    # Uniform on 2..9: each of the 8 sizes gets about 375 of the 3000 sets.
    assert stats.chisquare(counts).pvalue > 1e-4


def test_fixed_set_size(tmp_path):
    simulate_choice_data(tmp_path / "f.h5", sets=40, alternatives=(7, 7), params=2, moments=3)
    with ChoiceDataFile(tmp_path / "f.h5") as f:
        assert np.array_equal(f.offsets, np.arange(41) * 7)


def test_seed_design_is_timing_data_without_an_estimate(tmp_path):
    path = tmp_path / "seed.h5"
    summary = simulate_choice_data(path, design="seed", sets=200, alternatives=(30, 30), params=20, moments=40, seed=0)
    with ChoiceDataFile(path) as f:
        data = f.read_sets()
        assert not f.has_chosen and f.truth is None
        assert f.provenance["design"] == "seed" and f.provenance["estimable"] is False
        assert f.provenance["seed"] == 0 and f.provenance["command"] == "estpipe simulate"
    assert data.dm.min() >= 0 and data.dm.max() < 1
    assert abs(data.X.mean()) < 0.05 and abs(data.X.std() - 1) < 0.05
    assert summary.n_rows == 6000 and summary.bytes == 6000 * 60 * 8 and summary.truth is None


# -- clusters --------------------------------------------------------------------------------------
def _cluster_to_plain_trace_ratio(data, b, cluster):
    """trace of the clustered moment covariance over the plain one, both at b (DESIGN.md's S)."""
    s, _ = _logit_probabilities(data.X, data.offsets, b)
    h = np.add.reduceat(s[:, None] * data.dm, data.offsets[:-1])
    g = h.mean(axis=0)
    starts = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    h_c = np.add.reduceat(h, starts)
    n_c = np.diff(np.r_[starts, len(cluster)])[:, None]
    plain = np.trace((h - g).T @ (h - g))
    clustered = np.trace((h_c - n_c * g).T @ (h_c - n_c * g))
    return clustered / plain


def test_clusters_are_contiguous_with_the_asked_size_and_correlate_the_moments(tmp_path):
    C, sets = 40, 20_000
    simulate_choice_data(tmp_path / "c.h5", sets=sets, alternatives=(2, 6), params=3, moments=6, seed=1, cluster_size=C, chunk_sets=777)
    simulate_choice_data(tmp_path / "p.h5", sets=sets, alternatives=(2, 6), params=3, moments=6, seed=1)
    with ChoiceDataFile(tmp_path / "c.h5") as f:
        cluster = f.read_cluster()
        clustered = f.read_sets()
        assert f.provenance["cluster_shock_sd"] == CLUSTER_SHOCK_SD
        assert f.describe()["n_clusters"] == sets // C
        truth = f.truth
    assert np.array_equal(cluster, np.arange(sets) // C)
    assert np.array_equal(clustered.cluster, cluster)
    with ChoiceDataFile(tmp_path / "p.h5") as f:
        assert not f.has_cluster
        plain = f.read_sets()
    # The cluster shock makes the clustered covariance larger; without it the same grouping
    # changes nothing beyond noise.
    assert _cluster_to_plain_trace_ratio(clustered, truth, cluster) > 1.25
    assert 0.85 < _cluster_to_plain_trace_ratio(plain, truth, cluster) < 1.15


def test_last_cluster_may_be_shorter(tmp_path):
    simulate_choice_data(tmp_path / "c.h5", sets=10, alternatives=(2, 2), params=1, moments=1, cluster_size=4, chunk_sets=3)
    with ChoiceDataFile(tmp_path / "c.h5") as f:
        assert f.read_cluster().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


# -- refused options and failures -----------------------------------------------------------------
@pytest.mark.parametrize(
    "options, words",
    [
        pytest.param(dict(params=5, moments=4), ["--moments 4", "below --params 5", "M >= K"], id="M-below-K"),
        pytest.param(dict(params=2, moments=8), ["--moments 8", "at most 7"], id="M-beyond-instruments"),
        pytest.param(dict(alternatives=(1, 1)), ["--alternatives 1", "at least 2"], id="one-alternative"),
        pytest.param(dict(alternatives=(5, 2)), ["--alternatives 5:2", "empty"], id="empty-range"),
        pytest.param(dict(sets=0), ["--sets 0"], id="no-sets"),
        pytest.param(dict(design="probit"), ["--design 'probit'", "logit, seed"], id="unknown-design"),
        pytest.param(dict(cluster_size=0), ["--cluster-size 0"], id="empty-cluster"),
        pytest.param(dict(seed=-1), ["--seed -1"], id="negative-seed"),
    ],
)
def test_bad_options_are_refused_with_a_message_and_no_file(tmp_path, options, words):
    kw = dict(sets=10, alternatives=(3, 3), params=2, moments=3) | options
    with pytest.raises(UserError) as info, vocabulary(cli_flag):  # the messages as the command line has them
        simulate_choice_data(tmp_path / "out.h5", **kw)
    for w in words:
        assert w in str(info.value)
    assert os.listdir(tmp_path) == []


def test_the_python_api_names_its_own_arguments(tmp_path):
    with pytest.raises(UserError, match=r"^moments 4 is below params 5: .*; use moments 5 or more$"):
        simulate_choice_data(tmp_path / "out.h5", sets=10, params=5, moments=4)
    with pytest.raises(UserError, match=r"^design 'logti' is unknown; use one of logit, seed, mixed-logit, nested-logit \(did you mean 'logit'\?\)$"):
        simulate_choice_data(tmp_path / "out.h5", sets=10, design="logti")


def test_missing_output_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        simulate_choice_data(tmp_path / "no" / "out.h5", sets=10, alternatives=(3, 3), params=2, moments=2)


def test_a_failure_mid_way_leaves_no_file(tmp_path, monkeypatch):
    calls = []
    original = simulate_module._draw_choices

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return original(*args)

    monkeypatch.setattr(simulate_module, "_draw_choices", failing)
    with pytest.raises(RuntimeError, match="boom"):
        simulate_choice_data(tmp_path / "out.h5", sets=100, alternatives=(3, 3), params=2, moments=2, chunk_sets=10)
    assert os.listdir(tmp_path) == []


# -- the mixed-logit and nested-logit designs -----------------------------------------------------
from estpipe.data.simulate_models import nest_sizes, nested_logit_log_probabilities, nests_text  # noqa: E402
from estpipe.models import MODELS  # noqa: E402
from estpipe.orchestration import EstimateOptions, estimate  # noqa: E402


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(design="mixed-logit", random="x1,x3:-lognormal", correlated=True, panel_size=4, alternatives=(2, 5)), id="mixed-panel"),
        pytest.param(dict(design="mixed-logit", random=2, alternatives=(3, 3)), id="mixed-sets"),
        pytest.param(dict(design="nested-logit", nests=2, alternatives=(2, 6)), id="nested-missing-alternatives"),
        pytest.param(dict(design="nested-logit", nests=3, alternatives=(5, 5)), id="nested-all-alternatives"),
    ],
)
def test_model_designs_give_byte_equal_arrays_whatever_the_chunk_size(tmp_path, kw):
    kw = dict(sets=300, params=3, moments=9, seed=8) | kw
    simulate_choice_data(tmp_path / "whole.h5", chunk_sets=300, **kw)
    reference = _datasets(tmp_path / "whole.h5")
    assert {"X", "dm", "offsets", "chosen", "alt", "truth/params"} <= set(reference)
    assert ("panel" in reference) == ("panel_size" in kw)
    for chunk_sets in (37, 1):
        simulate_choice_data(tmp_path / f"c{chunk_sets}.h5", chunk_sets=chunk_sets, **kw)
        assert _datasets(tmp_path / f"c{chunk_sets}.h5") == reference, f"chunk_sets={chunk_sets}"


def test_mixed_logit_truth_is_named_in_the_models_parameter_order(tmp_path):
    path = tmp_path / "m.h5"
    summary = simulate_choice_data(path, design="mixed-logit", sets=90, alternatives=(3, 3), params=3, moments=9,
                                   random="x3,x1:-lognormal", correlated=True, panel_size=6, seed=1)
    with ChoiceDataFile(path) as f:
        truth, names, panel, data = f.truth, f.truth_names, f.read_panel(), f.read_sets()
        assert f.alt_names == ["a1", "a2", "a3"] and f.nests is None
        assert f.moment_names[:6] == ["x1", "x2", "x3", "x3^2-1", "x1^2-1", "x1*x3"]
    model = MODELS.get("mixed-logit").bind(f, random="x3,x1:-lognormal", correlated=True)
    assert names == model.param_names(["x1", "x2", "x3"]) == summary.truth_names
    assert names == ["b_x1", "x2", "b_x3", "chol_x3_x3", "chol_x1_x3", "chol_x1_x1"]
    assert truth[3] > 0 and truth[5] > 0  # a positive diagonal
    np.testing.assert_array_equal(panel, np.arange(90) // 6)
    np.testing.assert_array_equal(data.alt, np.tile([0, 1, 2], 90))
    assert summary.n_units == 15


@pytest.fixture(scope="module")
def mixed_panel_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "m.h5"
    simulate_choice_data(path, design="mixed-logit", sets=3000, alternatives=(4, 4), params=3, moments=6,
                         random="x2", panel_size=3, seed=2)
    return path


def test_mixed_logit_panel_data_recover_the_truth(mixed_panel_file):
    """`estimate --model mixed-logit --random x2` on the design's data lands within 4 standard
    errors of the stored truth, compared by name; the decision makers are the units."""
    r = estimate(mixed_panel_file, EstimateOptions(model="mixed-logit", random="x2", draws=100))
    assert r.converged and r.param_names == ["x1", "b_x2", "x3", "sd_x2"]
    assert r.truth is not None and r.units == "panel units" and r.n_clusters == 1000
    z = (r.params - r.truth) / r.std_errors
    assert np.all(np.abs(z) < 4), z
    assert r.truth[3] / r.std_errors[3] > 2.5  # the variance is identified by the instruments


def test_mixed_logit_coefficients_are_drawn_once_per_decision_maker(mixed_panel_file):
    """Within a decision maker the choices share a taste for x2, so the sets of one decision maker
    lean the same way: the chosen row's x2 less its set's mean correlates across the pairs of sets
    of one decision maker (4 standard errors above zero), and not across decision makers."""
    with ChoiceDataFile(mixed_panel_file) as f:
        data = f.read_sets()
    x2 = data.X[:, 1].reshape(-1, 4)
    lean = (x2[data.chosen.reshape(-1, 4) == 1] - x2.mean(axis=1)).reshape(-1, 3)  # (decision makers, sets)
    lean = (lean - lean.mean(axis=0)) / lean.std(axis=0)

    def correlation(a, b):
        return float(np.mean(a * b))

    pairs = [(0, 1), (0, 2), (1, 2)]
    within = np.mean([correlation(lean[:, i], lean[:, j]) for i, j in pairs])
    across = np.mean([correlation(lean[:, i], np.roll(lean[:, j], 1)) for i, j in pairs])
    se = 1 / np.sqrt(3 * len(lean))
    assert within > 4 * se, (within, se)
    assert abs(across) < 4 * se, (across, se)


def _nested_by_parts(V, nest, lam, sizes):
    """The nested logit as P(nest) P(j | nest), a loop over sets (a second, independent formula)."""
    out, r = np.empty_like(V), 0
    for size in sizes:
        v, k = V[r : r + size], nest[r : r + size]
        I = {m: np.exp(v[k == m] / lam[m]).sum() for m in np.unique(k)}
        denom = sum(I[m] ** lam[m] for m in I)
        for j in range(size):
            m = k[j]
            out[r + j] = np.log(I[m] ** lam[m] / denom * np.exp(v[j] / lam[m]) / I[m])
        r += size
    return out


def test_nested_logit_probabilities_equal_the_two_level_form_and_the_logit_at_lambda_1():
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 7, 60)
    rows = int(sizes.sum())
    V = 3 * rng.standard_normal(rows)
    nest = rng.integers(0, 3, rows)
    lam = np.array([0.3, 0.85, 1.0])
    logp = nested_logit_log_probabilities(V, nest, lam, sizes)
    np.testing.assert_allclose(logp, _nested_by_parts(V, nest, lam, sizes), rtol=1e-12, atol=1e-12)
    set_of_row = np.repeat(np.arange(len(sizes)), sizes)
    np.testing.assert_allclose(np.bincount(set_of_row, np.exp(logp)), 1.0, rtol=1e-12)
    logit = V - np.log(np.bincount(set_of_row, np.exp(V)))[set_of_row]
    np.testing.assert_allclose(nested_logit_log_probabilities(V, nest, np.ones(3), sizes), logit, rtol=1e-12, atol=1e-12)


def test_nests_are_contiguous_with_sizes_as_equal_as_possible():
    assert nest_sizes(10, 3) == [3, 3, 4] and nest_sizes(4, 4) == [1, 1, 1, 1]
    assert nests_text(10, 3) == "n1=a1,a2,a3; n2=a4,a5,a6; n3=a7,a8,a9,a10"


@pytest.fixture(scope="module")
def nested_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nested") / "n.h5"
    simulate_choice_data(path, design="nested-logit", sets=6000, alternatives=(4, 7), params=3, moments=9,
                         nests=3, seed=6)
    return path


def test_nested_logit_choice_shares_match_the_mean_probabilities(nested_file):
    """Per alternative, the share of sets choosing it equals the mean of its RU2 probabilities at
    the stored truth (4 standard errors); sets hold random subsets of the 7 alternatives."""
    with ChoiceDataFile(nested_file) as f:
        data, truth, names, nests = f.read_sets(), f.truth, f.truth_names, f.nests
        assert f.alt_names == [f"a{j}" for j in range(1, 8)]
    assert nests == "n1=a1,a2; n2=a3,a4; n3=a5,a6,a7"
    assert names == ["x1", "x2", "x3", "log_lambda_n1", "log_lambda_n2", "log_lambda_n3"]
    lam = np.exp(truth[3:])
    assert np.all((lam > 0.3) & (lam < 0.9))
    sizes = np.diff(data.offsets)
    assert sizes.min() == 4 and sizes.max() == 7
    set_of_row = np.repeat(np.arange(len(sizes)), sizes)
    # each set lists distinct alternatives, in order
    assert np.all((np.diff(data.alt) > 0) | (np.diff(set_of_row) > 0))
    nest = np.array([0, 0, 1, 1, 2, 2, 2])[data.alt]
    p = np.exp(nested_logit_log_probabilities(data.X @ truth[:3], nest, lam, sizes))
    chosen = data.chosen.astype(float)
    for j in range(7):
        at = data.alt == j
        share, mean_p = chosen[at].sum() / len(sizes), p[at].sum() / len(sizes)
        se = np.sqrt(np.sum(p[at] * (1 - p[at]))) / len(sizes)
        assert abs(share - mean_p) < 4 * se, (j, share, mean_p)
    # and the chosen rows follow the nesting: within nest 3 the shares are not those of a logit
    # with the same b (lambda < 1 concentrates choices on the nest's best alternative)
    logit = np.exp(data.X @ truth[:3] - np.log(np.bincount(set_of_row, np.exp(data.X @ truth[:3])))[set_of_row])
    assert np.abs(np.bincount(set_of_row, chosen * np.log(p)).sum() - np.bincount(set_of_row, chosen * np.log(logit)).sum()) > 10


def test_nested_logit_instruments_are_x_and_x_times_the_nest_dummies(nested_file):
    with ChoiceDataFile(nested_file) as f:
        data, moment_names = f.read_sets(), f.moment_names
    # every alternative is in a nest with a parameter: the last nest's dummy is left out (the
    # dummies sum to 1, so x would be the sum of its interactions and S singular)
    assert moment_names == ["x1", "x2", "x3", "x1*d_n1", "x1*d_n2", "x2*d_n1", "x2*d_n2", "x3*d_n1", "x3*d_n2"]
    nest = np.array([0, 0, 1, 1, 2, 2, 2])[data.alt]
    Z = np.column_stack([data.X] + [data.X[:, k] * (nest == n) for k in range(3) for n in range(2)])
    sizes = np.diff(data.offsets)
    np.testing.assert_allclose(data.dm, Z - np.repeat(Z[data.chosen == 1], sizes, axis=0), rtol=0, atol=1e-15)


@pytest.mark.skipif("nested-logit" not in MODELS, reason="the nested-logit model is not registered on this branch")
def test_nested_logit_data_recover_the_truth(nested_file):
    with ChoiceDataFile(nested_file) as f:
        nests = f.nests
    # from a first logit fit's b and lambda = 1: from b = 0 every utility is 0, where the moments hardly
    # see lambda (tests/test_nested_logit.py)
    b = estimate(nested_file, EstimateOptions(model="logit", steps=1)).params
    r = estimate(nested_file, EstimateOptions(model="nested-logit", nests=nests, start=list(b) + [0.0] * 3))
    assert r.converged and r.truth is not None
    z = (r.params - r.truth) / r.std_errors
    assert np.all(np.abs(z) < 4), z


@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param(["--random", "x1"], ["--random is for --design mixed-logit", "not logit"], id="random-for-logit"),
        pytest.param(["--panel-size", "3"], ["--panel-size is for --design mixed-logit"], id="panel-size-for-logit"),
        pytest.param(["--design", "mixed-logit", "--nests", "2"], ["--nests is for --design nested-logit"], id="nests-for-mixed"),
        pytest.param(["--design", "mixed-logit", "--cluster-size", "4"], ["--cluster-size", "use --panel-size"], id="clusters-for-mixed"),
        pytest.param(["--design", "mixed-logit", "--random", "x9"], ["--random: 'x9' is not a column of x"], id="random-unknown"),
        pytest.param(["--design", "mixed-logit", "--random", "4"], ["--random 4", "between 1 and --params (3)"], id="random-count"),
        pytest.param(["--design", "mixed-logit", "--random", "x1,x2", "--correlated", "--moments", "5"],
                     ["--moments 5", "below the 6 parameters", "chol_x2_x1"], id="too-few-moments"),
        pytest.param(["--design", "mixed-logit", "--panel-size", "0"], ["--panel-size 0"], id="empty-decision-maker"),
        pytest.param(["--design", "nested-logit", "--nests", "5"], ["--nests 5", "between 1 and 4"], id="more-nests-than-alternatives"),
        pytest.param(["--design", "nested-logit", "--moments", "30"], ["--moments 30", "at most 9"], id="nested-too-many-moments"),
    ],
)
def test_bad_model_design_options_are_one_line_exit_2_and_no_file(tmp_path, args, words):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "estpipe", "simulate", str(tmp_path / "o.h5"), "--sets", "20",
                           "--alternatives", "4", "--params", "3", "--moments", "6", *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("estpipe: error: "), done.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert os.listdir(tmp_path) == []
