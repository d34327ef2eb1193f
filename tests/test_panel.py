"""Panel units (decision makers) are the independent observations (DESIGN.md, "Panel units").

A Monte Carlo over 40 simulated panels shows that set-level S gives standard errors too small
(and a J test that over-rejects) when a decision maker's sets share a random component, and that
per-unit S does not; partitions, dask workers and tiles cut only between units and do not change
the estimate; the panel mixed logit recovers its truth; the results say what the units were, and
clusters, when a file has them too, are the units.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from estpipe.data.format import ChoiceData, read_choice_data, write_choice_data
from estpipe.data.problem import read_problem
from estpipe.execution.planning import plan_partitions, unit_ids
from estpipe.kernel import PartitionKernel, engine, tiles
from estpipe.kernel.tiles import plan_tiles
from estpipe.models import get_model
from estpipe.orchestration import EstimateOptions, estimate

N_DATA = 40
# the spread of 40 estimates (80 pooled) is known to about +-11%: 1.35 is more than 3 of those
# (tests/test_gmm_statistics.py)
BAND = 1.35


def _dm(Z, chosen, offsets):
    """dm = z - z_chosen per set: (rows, M); every set has exactly one chosen row."""
    sizes = np.diff(offsets)
    return Z - np.repeat(Z[chosen == 1], sizes, axis=0)


# -- Monte Carlo: set-level S is too small, per-unit S is right ----------------------------------------

HABIT_B = np.array([1.0, -0.5])


def _habit_panel(path, seed, units=150, T=8, J=4, rho=0.9, panel=True):
    """A logit that is exactly right for every set, with choices correlated within a decision
    maker: unit u faces the same J x 2 attributes in each of its T sets, draws one "habit" choice
    from the logit, and in each set repeats it with probability rho, else draws afresh from the
    same logit. Every set's choice is logit(x b), but two sets of one unit agree more often than
    chance (corr of their residuals rho^2), so Var(sum_t h_t) ~ (1 + (T - 1) rho^2) T Var(h):
    set-level standard errors too small by about sqrt(6.7) = 2.6. Instruments x1, x2, x1^2 - 1,
    x1 x2 (M = 4 > K = 2, so J has 2 degrees of freedom). panel=False: the same data without
    panel ids."""
    rng = np.random.default_rng(seed)
    Xu = rng.standard_normal((units, J, 2))
    u = Xu @ HABIT_B
    p = np.exp(u - u.max(axis=1, keepdims=True))
    cum = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)

    def draw(n):  # (units, n) logit draws of each unit's alternatives
        return (rng.random((units, n, 1)) > cum[:, None, :]).sum(axis=2)

    habit, fresh = draw(1), draw(T)
    pick = np.where(rng.random((units, T)) < rho, habit, fresh)
    n = units * T
    X = np.repeat(Xu[:, None], T, axis=1).reshape(n * J, 2)
    chosen = np.zeros((n, J), dtype=np.int8)
    chosen[np.arange(n), pick.ravel()] = 1
    chosen = chosen.ravel()
    offsets = np.arange(n + 1, dtype=np.int64) * J
    Z = np.column_stack([X, X[:, 0] ** 2 - 1, X[:, 0] * X[:, 1]])
    write_choice_data(path, ChoiceData(X=X, dm=_dm(Z, chosen, offsets), offsets=offsets, chosen=chosen,
                                       panel=np.repeat(np.arange(units, dtype=np.int64), T) if panel else None),
                      ["x1", "x2"], ["z1", "z2", "z11", "z12"], provenance={"command": "test"}, truth=HABIT_B)
    return path


def _monte_carlo(tmp_path, simulate, **kw):
    """{True: per-unit (file with panel ids), False: set-level (the same data without)} ->
    (estimates (N_DATA, K), standard errors (N_DATA, K), J p-values (N_DATA,))."""
    out = {}
    for panel in (True, False):
        est, se, jp = [], [], []
        for seed in range(N_DATA):
            path = simulate(tmp_path / f"mc-{int(panel)}.h5", 7000 + seed, panel=panel, **kw)
            r = estimate(path, EstimateOptions())
            assert r.converged, r.message
            d = r.to_dict()
            assert (d["se_type"], d["units"], d["n_clusters"]) == (("clustered", "panel units", kw.get("units", 150))
                                                                   if panel else ("robust", "sets", None))
            est.append(r.params)
            se.append(r.std_errors)
            jp.append(np.nan if r.j_pvalue is None else r.j_pvalue)
        out[panel] = np.array(est), np.array(se), np.array(jp)
    return out


def _ratio(errors, se, axis=None):
    """sd of the estimates over the root mean square standard error (1 when the se are right)."""
    return np.std(errors, axis=axis) / np.sqrt(np.mean(np.square(se), axis=axis))


def test_set_level_s_understates_the_standard_errors_of_a_panel_and_per_unit_s_does_not(tmp_path):
    mc = _monte_carlo(tmp_path, _habit_panel)
    n = N_DATA * len(HABIT_B)
    lo, hi = stats.binom.ppf(0.001, n, 0.95), stats.binom.isf(0.001, n, 0.95)
    reject_hi = stats.binom.isf(0.001, N_DATA, 0.05)  # J's 5% test rejecting more than this: too often

    est, se, jp = mc[True]
    ratio = _ratio(est - HABIT_B, se)
    assert 1 / BAND < ratio < BAND, f"per-unit S: sd(estimates) / se = {ratio:.3f}"
    hits = int(np.sum(np.abs(est - HABIT_B) <= stats.norm.ppf(0.975) * se))
    assert lo <= hits <= hi, f"per-unit S: 95% intervals cover {hits}/{n}, outside [{lo}, {hi}]"
    assert np.sum(jp < 0.05) <= reject_hi, f"per-unit J rejects {np.sum(jp < 0.05)}/{N_DATA} at 5%"

    est_s, se_s, jp_s = mc[False]
    ratio_s = _ratio(est_s - HABIT_B, se_s)
    # too small by more than the noise band twice over (the design's factor is about 2.6)
    assert ratio_s > BAND * BAND, f"set-level S: sd(estimates) / se = {ratio_s:.3f}, expected well above 1"
    hits_s = int(np.sum(np.abs(est_s - HABIT_B) <= stats.norm.ppf(0.975) * se_s))
    assert hits_s < lo, f"set-level S: 95% intervals cover {hits_s}/{n}, expected fewer than {lo}"
    assert np.sum(jp_s < 0.05) > reject_hi, f"set-level J rejects only {np.sum(jp_s < 0.05)}/{N_DATA} at 5%"
    # the same data, so the per-unit standard errors are larger in every data set
    assert np.all(se > 1.5 * se_s)


def _taste_panel(path, seed, units=150, T=8, J=4, sd=2.0, panel=True):
    """A decision maker's random taste for x2 (N(-0.5, sd^2), one per unit, shared by its T
    sets), estimated as a logit with z = x (just identified: the estimate is the same with
    either S, the pseudo-true logit coefficients are its limit, and only the standard errors
    differ). Attributes vary across sets."""
    rng = np.random.default_rng(seed)
    n = units * T
    X = rng.standard_normal((n * J, 2))
    b2 = np.repeat(-0.5 + sd * rng.standard_normal(units), T * J)
    u = (X[:, 0] + X[:, 1] * b2).reshape(n, J) + rng.gumbel(size=(n, J))
    chosen = np.zeros((n, J), dtype=np.int8)
    chosen[np.arange(n), u.argmax(axis=1)] = 1
    chosen = chosen.ravel()
    offsets = np.arange(n + 1, dtype=np.int64) * J
    write_choice_data(path, ChoiceData(X=X, dm=_dm(X, chosen, offsets), offsets=offsets, chosen=chosen,
                                       panel=np.repeat(np.arange(units, dtype=np.int64), T) if panel else None),
                      ["x1", "x2"], ["z1", "z2"], provenance={"command": "test"})
    return path


def test_a_shared_random_taste_needs_per_unit_s_too(tmp_path):
    """The spread is measured about the mean of the 40 estimates (the logit's pseudo-true value
    is not known in closed form); the taste makes x2's moments correlated within a unit."""
    mc = _monte_carlo(tmp_path, _taste_panel)
    est, se, _ = mc[True]
    est_s, se_s, _ = mc[False]
    np.testing.assert_allclose(est, est_s, rtol=1e-8)  # just identified: W does not matter
    ratio = _ratio(est - est.mean(axis=0), se, axis=0)
    assert np.all((1 / BAND < ratio) & (ratio < BAND)), f"per-unit S: sd / se = {ratio}"
    ratio_s = _ratio(est_s - est_s.mean(axis=0), se_s, axis=0)
    assert ratio_s[1] > BAND * 1.2, f"set-level S: sd / se of x2 = {ratio_s[1]:.3f}, expected well above 1"
    assert np.mean(se[:, 1]) > 1.5 * np.mean(se_s[:, 1])


# -- partitions, workers and tiles cut only between units -----------------------------------------------

MIXED_TRUE = {"x1": 1.0, "b_x2": -0.8, "x3": 0.5, "sd_x2": 1.0}


def _mixed_panel(path, seed, units=300, max_sets=12, cluster_size=None):
    """Panel mixed-logit data, exactly the model (models/mixed_logit.py) with a normal coefficient
    on x2 drawn once per decision maker: units of uneven sizes (1..max_sets sets) and sets of 2..5
    alternatives, so equal-row partitions and tiles would cut through units. Instruments x,
    x2^2 - 1, x1 x2, x2 x3. cluster_size: clusters of that many consecutive units (ids stored)."""
    rng = np.random.default_rng(seed)
    sets_per_unit = rng.integers(1, max_sets + 1, units)
    unit = np.repeat(np.arange(units, dtype=np.int64), sets_per_unit)
    n = len(unit)
    sizes = rng.integers(2, 6, n)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    rows = int(offsets[-1])
    set_of_row = np.repeat(np.arange(n), sizes)
    X = rng.standard_normal((rows, 3))
    beta2 = MIXED_TRUE["b_x2"] + MIXED_TRUE["sd_x2"] * rng.standard_normal(units)
    u = X[:, 0] * MIXED_TRUE["x1"] + X[:, 1] * beta2[unit[set_of_row]] + X[:, 2] * MIXED_TRUE["x3"] + rng.gumbel(size=rows)
    best = np.full(n, -np.inf)
    np.maximum.at(best, set_of_row, u)
    chosen = (u == best[set_of_row]).astype(np.int8)
    Z = np.column_stack([X, X[:, 1] ** 2 - 1, X[:, 0] * X[:, 1], X[:, 1] * X[:, 2]])
    cluster = None if cluster_size is None else unit // cluster_size
    write_choice_data(path, ChoiceData(X=X, dm=_dm(Z, chosen, offsets), offsets=offsets, chosen=chosen,
                                       panel=unit, cluster=cluster),
                      ["x1", "x2", "x3"], ["z1", "z2", "z3", "z22", "z12", "z23"], provenance={"command": "test"})
    return path


@pytest.fixture(scope="module")
def panel_file(tmp_path_factory):
    return _mixed_panel(tmp_path_factory.mktemp("panel") / "panel.h5", seed=5)


@pytest.fixture(scope="module")
def cluster():
    from test_estimate_dask import local_cluster  # the environment-preserving LocalCluster

    with local_cluster(2) as c:
        yield c


def _cuts_only_between_units(unit, starts):
    """No start (a set index > 0) lies inside a unit."""
    starts = np.asarray([s for s in starts if 0 < s < len(unit)], dtype=np.int64)
    return bool(np.all(unit[starts - 1] != unit[starts]))


@pytest.mark.parametrize("n_partitions", [2, 3, 7, 16])
def test_partitions_cut_only_between_units(panel_file, n_partitions):
    problem = read_problem(panel_file)
    unit = problem.panel
    assert np.array_equal(unit_ids(problem), unit)
    parts = plan_partitions(problem.offsets, n_partitions, unit_ids(problem))
    assert len(parts) == n_partitions
    assert parts[0].start == 0 and parts[-1].stop == problem.n_sets
    assert all(a.stop == b.start for a, b in zip(parts[:-1], parts[1:]))
    assert _cuts_only_between_units(unit, [p.start for p in parts])
    # the file is one where it matters: cuts by rows alone would split a unit
    naive = plan_partitions(problem.offsets, n_partitions, None)
    assert not _cuts_only_between_units(unit, [p.start for p in naive])
    # a partition read from the file carries its units' global ids
    p = parts[1]
    assert np.array_equal(read_choice_data(panel_file, p.start, p.stop).panel, unit[p.start : p.stop])


@pytest.mark.parametrize("tile_rows", [3, 17, 60, 400])
def test_tiles_cut_only_between_units_and_do_not_change_the_sums(panel_file, tile_rows):
    data = read_choice_data(panel_file)
    planned = plan_tiles(data.offsets, tile_rows, data.panel)
    assert _cuts_only_between_units(data.panel, [t.set_start for t in planned])
    assert planned[0].set_start == 0 and planned[-1].set_stop == data.n_sets
    # a unit larger than tile_rows gets a tile of its own, nothing larger
    for t in planned:
        if t.row_stop - t.row_start > tile_rows:
            assert len(np.unique(data.panel[t.set_start : t.set_stop])) == 1
    n_units = len(np.unique(data.panel))
    mixed = get_model("mixed-logit").bind(read_problem(panel_file), random="x2", draws=20)
    for model, b in (("logit", np.array([0.9, -0.7, 0.4])), (mixed, np.array([0.9, -0.7, 0.4, 0.8]))):
        base = PartitionKernel(data, model=model, tile_rows=10**6, threads=1).sums(b, covariance=True)
        s = PartitionKernel(data, model=model, tile_rows=tile_rows, threads=2).sums(b, covariance=True)
        assert base.n_units == s.n_units == n_units
        # summed in another order: equal to rounding, relative to the largest entry
        np.testing.assert_allclose(s.gG, base.gG, rtol=1e-12, atol=1e-12 * np.abs(base.gG).max())
        np.testing.assert_allclose(s.hh, base.hh, rtol=1e-12, atol=1e-12 * np.abs(base.hh).max())


MODELS = {
    "logit": dict(model="logit"),
    "mixed-logit": dict(model="mixed-logit", random="x2", draws=25),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_partitions_workers_and_tiles_do_not_change_the_estimate(panel_file, cluster, model, monkeypatch):
    """In-process (1 partition) = dask workers (real processes, 3 and 7 partitions, units across
    the row-balanced boundaries) = in-process with small tiles, to 1e-10."""
    ref = estimate(panel_file, EstimateOptions(**MODELS[model]))
    assert ref.converged and ref.units == "panel units"
    for n_partitions in (3, 7):
        r = estimate(panel_file, EstimateOptions(scheduler=cluster.scheduler_address, partitions=n_partitions,
                                                 **MODELS[model]))
        assert r.telemetry.partitions == n_partitions
        np.testing.assert_allclose(r.params, ref.params, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.std_errors, ref.std_errors, rtol=1e-10)
        np.testing.assert_allclose(r.j_statistic, ref.j_statistic, rtol=1e-8, atol=1e-12)
        assert r.n_clusters == ref.n_clusters == 300
    monkeypatch.setattr(tiles, "DEFAULT_TILE_ROWS", 40)
    monkeypatch.setattr(engine, "DEFAULT_TILE_ROWS", 40)
    small = estimate(panel_file, EstimateOptions(**MODELS[model]))
    np.testing.assert_allclose(small.params, ref.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(small.std_errors, ref.std_errors, rtol=1e-10)


def test_workers_2_equals_in_process_for_the_panel_mixed_logit(panel_file):
    options = dict(MODELS["mixed-logit"], steps=1)
    ref = estimate(panel_file, EstimateOptions(**options))
    r = estimate(panel_file, EstimateOptions(workers=2, partitions=5, **options))
    assert (r.telemetry.workers, r.telemetry.partitions) == (2, 5)
    np.testing.assert_allclose(r.params, ref.params, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.std_errors, ref.std_errors, rtol=1e-10)


# -- recovery: the panel mixed logit ------------------------------------------------------------------

def test_panel_mixed_logit_recovers_the_truth(tmp_path):
    path = _mixed_panel(tmp_path / "recover.h5", seed=21, units=600, max_sets=10)
    r = estimate(path, EstimateOptions(model="mixed-logit", random="x2", draws=50))
    assert r.converged and r.param_names == list(MIXED_TRUE)
    assert (r.se_type, r.units, r.n_clusters) == ("clustered", "panel units", 600)
    z = (r.params - np.array(list(MIXED_TRUE.values()))) / r.std_errors
    assert np.all(np.abs(z) < 4), dict(zip(r.param_names, z))
    assert r.std_errors[3] < 0.25  # sd_x2 is identified by the panel, not just not rejected
    assert r.j_pvalue > 0.001, r.j_statistic


# -- what the results say ----------------------------------------------------------------------------

def test_results_name_the_units_and_clusters_take_over(tmp_path):
    """Panel only: clustered by decision maker. Panel units nested in clusters: the clusters are
    the units (the same numbers as the file with clusters only). --no-cluster: the panel units
    again (the same numbers as the file with panel units only)."""
    panel = _mixed_panel(tmp_path / "p.h5", seed=8, units=200)
    both = _mixed_panel(tmp_path / "pc.h5", seed=8, units=200, cluster_size=10)
    data = read_choice_data(both)
    clusters_only = tmp_path / "c.h5"
    write_choice_data(clusters_only, ChoiceData(X=data.X, dm=data.dm, offsets=data.offsets, chosen=data.chosen,
                                                cluster=data.cluster), ["x1", "x2", "x3"],
                      ["z1", "z2", "z3", "z22", "z12", "z23"])

    p = estimate(panel, EstimateOptions())
    d = p.to_dict()
    assert (d["se_type"], d["units"], d["n_clusters"]) == ("clustered", "panel units", 200)
    assert "clustered standard errors (200 decision makers)" in p.table()
    assert d["j_df"] == 3 and d["j_statistic"] is not None

    b = estimate(both, EstimateOptions())
    c = estimate(clusters_only, EstimateOptions())
    assert (b.se_type, b.units, b.n_clusters) == ("clustered", "clusters", 20)
    assert "(20 clusters)" in b.table()
    np.testing.assert_allclose(b.params, c.params, rtol=1e-10)
    np.testing.assert_allclose(b.std_errors, c.std_errors, rtol=1e-10)
    np.testing.assert_allclose(b.j_statistic, c.j_statistic, rtol=1e-8)
    # coarser units than the decision makers: the standard errors differ from the panel's
    assert not np.allclose(b.std_errors, p.std_errors, rtol=1e-3)

    n = estimate(both, EstimateOptions(no_cluster=True))
    assert (n.se_type, n.units, n.n_clusters) == ("clustered", "panel units", 200)
    np.testing.assert_allclose(n.params, p.params, rtol=1e-10)
    np.testing.assert_allclose(n.std_errors, p.std_errors, rtol=1e-10)
