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
