"""Maximum likelihood (--estimator mle, first slice): the logit MLE equals the GMM with z = x and
its robust errors equal GMM's; its classical errors equal an independent closed-form Hessian and
statsmodels' ConditionalLogit; scores against central differences of the log-likelihood (logit,
nested logit with missing alternatives); the OPG per unit and per cluster against per-set scores,
whatever the tiles and partitions; nested logit at lambda = 1 has the logit's scores; in-process
equals real dask workers; recovery on simulated nested-logit data; bad input as one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import estimate_error_line
from estpipe.data.format import ChoiceData, ChoiceDataFile, write_choice_data
from estpipe.kernel import PartitionKernel
from estpipe.kernel.request import Request
from estpipe.models import get_model
from estpipe.orchestration import EstimateOptions, estimate
from test_nested_logit import B_TRUE, LAMBDA_TRUE, NESTS, Facts, _simulate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def modechoice(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "mc.h5"
    subprocess.run([sys.executable, "-m", "estpipe", "load", str(REPO / "data" / "modechoice.csv"), str(path),
                    "--set-col", "individual", "--choice-col", "choice", "--x", "invc,invt,ttme", "--alt-col", "mode",
                    "--asc"], check=True, capture_output=True, timeout=120)
    return path


def _logit_probabilities(X, offsets, b):
    u = X @ b
    s = np.empty_like(u)
    for a, z in zip(offsets[:-1], offsets[1:]):
        e = np.exp(u[a:z] - u[a:z].max())
        s[a:z] = e / e.sum()
    return s


def test_logit_mle_is_gmm_with_z_x_and_its_classical_errors_the_closed_form_hessian(modechoice):
    mle = estimate(modechoice, EstimateOptions(estimator="mle"))
    gmm = estimate(modechoice, EstimateOptions())
    assert mle.converged and mle.se_type == "robust" and mle.param_names == gmm.param_names
    assert round(float(mle.params[0]), 5) == -0.01391  # Greene's clogit, invc
    np.testing.assert_allclose(mle.params, gmm.params, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(mle.std_errors, gmm.std_errors, rtol=1e-8)
    np.testing.assert_allclose(mle.loglik, gmm.loglik, rtol=1e-12)
    # -H = sum_i X~' diag(s) X~, X~ = X minus the set's s-weighted mean, at the estimate
    with ChoiceDataFile(modechoice) as f:
        d = f.read_sets(0, f.n_sets)
    s = _logit_probabilities(d.X, d.offsets, mle.params)
    info = np.zeros((d.K, d.K))
    for a, z in zip(d.offsets[:-1], d.offsets[1:]):
        Xt = d.X[a:z] - s[a:z] @ d.X[a:z]
        info += Xt.T @ (s[a:z, None] * Xt)
    se = np.sqrt(np.diag(np.linalg.inv(info)))
    np.testing.assert_allclose(mle.std_errors_of("classical"), se, rtol=1e-6)
    out = mle.to_dict()
    assert out["std_errors_robust"] == pytest.approx(list(gmm.std_errors), rel=1e-8)
    assert out["loglik_null"] == pytest.approx(-float(np.sum(np.log(np.diff(d.offsets)))), rel=1e-12)
    assert out["rho_squared"] == pytest.approx(1 - out["loglik"] / out["loglik_null"])
    assert out["aic"] == pytest.approx(2 * 6 - 2 * out["loglik"]) and out["bic"] == pytest.approx(
        6 * np.log(210) - 2 * out["loglik"])
    assert out["j_statistic"] is None and set(gmm.to_dict()) <= set(out)
    table = mle.table()
    assert "classical" in table and "robust" in table and f"{se[0]:.4g}" in table


def test_classical_errors_equal_statsmodels_conditional_logit(modechoice):
    from statsmodels.discrete.conditional_models import ConditionalLogit

    with ChoiceDataFile(modechoice) as f:
        d = f.read_sets(0, f.n_sets)
    groups = np.repeat(np.arange(len(d.offsets) - 1), np.diff(d.offsets))
    fit = ConditionalLogit(d.chosen.astype(float), d.X, groups=groups).fit(method="newton", disp=False, maxiter=100,
                                                                           tol=1e-14)
    mle = estimate(modechoice, EstimateOptions(estimator="mle"))
    np.testing.assert_allclose(mle.params, fit.params, rtol=1e-7)
    np.testing.assert_allclose(mle.std_errors_of("classical"), np.sqrt(np.diag(fit.cov_params())), rtol=1e-5)


def _random_sets(seed, n=60, J=5, K=2, missing=True):
    rng = np.random.default_rng(seed)
    alts = [np.sort(rng.choice(J, rng.integers(2, J + 1), replace=False)) if missing else np.arange(J) for _ in range(n)]
    sizes = np.array([len(a) for a in alts])
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    chosen = np.zeros(offsets[-1], dtype=np.int8)
    chosen[offsets[:-1] + rng.integers(0, sizes)] = 1
    cluster = np.repeat(np.arange(n // 3), 3).astype(np.int64)  # clusters of 3 sets
    return ChoiceData(X=rng.standard_normal((offsets[-1], K)), dm=rng.standard_normal((offsets[-1], 3)),
                      offsets=offsets, chosen=chosen, cluster=cluster, alt=np.concatenate(alts).astype(np.int32))


def _nested_model(K=2):
    return get_model("nested-logit").bind(Facts(K, [f"a{j + 1}" for j in range(5)]), nests="n1=a1,a2; n2=a3,a4,a5")


@pytest.mark.parametrize("which", ["logit", "nested-logit"])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_are_central_differences_of_the_loglik(which, seed):
    data = _random_sets(seed)
    model = "logit" if which == "logit" else _nested_model()
    k = PartitionKernel(data, model=model, tile_rows=17)
    rng = np.random.default_rng(seed + 10)
    params = np.r_[rng.uniform(-1, 1, 2), np.log(rng.uniform(0.4, 1.5, k.n_params - 2))]
    s = k.evaluate(Request.for_likelihood(params))
    central = np.empty(k.n_params)
    for j in range(k.n_params):
        e = np.zeros(k.n_params)
        e[j] = 1e-6
        central[j] = (k.evaluate(Request.for_likelihood(params + e)).loglik
                      - k.evaluate(Request.for_likelihood(params - e)).loglik) / 2e-6
    np.testing.assert_allclose(s.score, central, rtol=1e-6, atol=1e-6)
    assert s.n_chosen == data.n_sets and s.loglik < 0


def test_opg_per_unit_and_per_cluster_from_per_set_scores_across_tiles_and_partitions():
    """The logit's per-set score x_chosen - sum s x, summed per set (OPG over sets) and per
    cluster of 3 sets, computed here; the kernel's, with tiles that cut clusters, and split into
    two partitions at a cluster boundary and added, equal them."""
    data = _random_sets(4, n=90)
    b = np.array([0.3, -0.7])
    s = _logit_probabilities(data.X, data.offsets, b)
    per_set = np.array([data.X[a:z][data.chosen[a:z] == 1].sum(axis=0) - s[a:z] @ data.X[a:z]
                        for a, z in zip(data.offsets[:-1], data.offsets[1:])])
    per_cluster = np.add.reduceat(per_set, np.arange(0, 90, 3), axis=0)
    whole = PartitionKernel(data, model="logit", tile_rows=7).evaluate(Request.for_likelihood(b))
    cut = 45  # a cluster boundary (clusters of 3 sets)
    halves = [ChoiceData(X=data.X[data.offsets[a]:data.offsets[z]], dm=data.dm[data.offsets[a]:data.offsets[z]],
                         offsets=data.offsets[a:z + 1] - data.offsets[a],
                         chosen=data.chosen[data.offsets[a]:data.offsets[z]], cluster=data.cluster[a:z],
                         alt=data.alt[data.offsets[a]:data.offsets[z]]) for a, z in ((0, cut), (cut, 90))]
    added = sum(PartitionKernel(h, model="logit", tile_rows=11).evaluate(Request.for_likelihood(b)) for h in halves)
    for got in (whole, added):
        np.testing.assert_allclose(got.score, per_set.sum(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.opg, per_set.T @ per_set, rtol=1e-12)
        np.testing.assert_allclose(got.opg_cluster, per_cluster.T @ per_cluster, rtol=1e-12)
        assert (got.n_units, got.n_clusters) == (90, 30)
    unclustered = PartitionKernel(data, model="logit").evaluate(Request.for_likelihood(b, clustered=False))
    assert unclustered.opg_cluster is None and unclustered.n_clusters == 0


def test_nested_logit_at_lambda_one_has_zero_beta_scores_at_the_logit_mle(tmp_path):
    path = _simulate(tmp_path / "n.h5", seed=3, n=800)
    logit = estimate(path, EstimateOptions(estimator="mle"))
    with ChoiceDataFile(path) as f:
        data = f.read_sets(0, f.n_sets)
    model = get_model("nested-logit").bind(Facts(2, [f"a{j + 1}" for j in range(6)]), nests=NESTS)
    s = PartitionKernel(data, model=model).evaluate(Request.for_likelihood(np.r_[logit.params, 0.0, 0.0]))
    scale = np.sqrt(np.diag(s.opg))
    assert np.all(np.abs(s.score[:2]) < 1e-8 * scale[:2]), (s.score, scale)
    assert np.any(np.abs(s.score[2:]) > 1e-3 * scale[2:])  # lambda is not at its MLE there: the test can fail
    assert s.loglik == pytest.approx(logit.loglik, rel=1e-12)


def test_nested_logit_recovery_and_dask_workers_equal_in_process(tmp_path):
    path = _simulate(tmp_path / "n.h5", seed=11)
    options = dict(model="nested-logit", nests=NESTS, estimator="mle")
    base = estimate(path, EstimateOptions(**options))
    assert base.converged and base.param_names == ["x1", "x2", "log_lambda_n1", "log_lambda_n2"]
    z = (base.params - np.r_[B_TRUE, np.log(LAMBDA_TRUE)]) / base.std_errors
    assert np.all(np.abs(z) < 4), z
    assert {d.name for d in base.derived} == {"lambda_n1", "lambda_n2"}
    dask = estimate(path, EstimateOptions(workers=2, **options))
    assert dask.telemetry.workers == 2
    np.testing.assert_allclose(dask.params, base.params, rtol=1e-8, atol=1e-10)
    # the Hessian is a forward difference (error ~1e-8): estimates 1e-10 apart move it by ~1e-8
    np.testing.assert_allclose(dask.std_errors, base.std_errors, rtol=1e-6)
    np.testing.assert_allclose(dask.std_errors_of("classical"), base.std_errors_of("classical"), rtol=1e-6)


def test_clustered_file_gives_clustered_errors(tmp_path):
    path = tmp_path / "c.h5"
    data = _random_sets(7, n=300, missing=False)
    write_choice_data(path, data, ["x1", "x2"], ["m1", "m2", "m3"], alt_names=[f"a{j + 1}" for j in range(5)])
    r = estimate(path, EstimateOptions(estimator="mle"))
    ignored = estimate(path, EstimateOptions(estimator="mle", no_cluster=True))
    assert (r.se_type, r.n_clusters, ignored.se_type) == ("clustered", 100, "robust")
    np.testing.assert_allclose(r.params, ignored.params, rtol=1e-10)
    np.testing.assert_allclose(r.std_errors_of("classical"), ignored.std_errors_of("classical"), rtol=1e-8)
    assert not np.allclose(r.std_errors, ignored.std_errors, rtol=1e-3)
    assert r.to_dict()["std_errors_robust"] == pytest.approx(list(r.std_errors))


def test_bad_input_is_one_line(tmp_path, modechoice):
    path = tmp_path / "nochosen.h5"
    d = _random_sets(1, missing=False)
    write_choice_data(path, ChoiceData(X=d.X, dm=d.dm, offsets=d.offsets), ["x1", "x2"], ["m1", "m2", "m3"])
    line = estimate_error_line(path, ["--estimator", "mle"], "logit")
    assert "no chosen rows" in line and "--estimator mle" in line
    line = estimate_error_line(modechoice, ["--estimator", "mel"], "logit")
    assert "unknown estimator 'mel'" in line and "did you mean 'mle'" in line
    line = estimate_error_line(modechoice, ["--estimator", "mle", "--derivatives", "fd"], "logit")
    assert "--derivatives fd" in line


def test_a_job_spec_runs_the_mle_and_writes_and_resumes_its_checkpoint(tmp_path):
    spec = tmp_path / "job.toml"
    spec.write_text('[data]\npath = "d.h5"\ndesign = "logit"\nsets = 300\nalternatives = 4\nparams = 3\nmoments = 3\n'
                    'seed = 0\n\n[estimate]\nestimator = "mle"\n\n[backend]\nkind = "local"\nworkers = 1\n\n'
                    '[output]\nresults = "r.json"\ncheckpoint = "c.json"\n')
    done = subprocess.run([sys.executable, "-m", "estpipe", "run", str(spec)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    r = json.loads((tmp_path / "r.json").read_text())
    assert r["estimator"] == "mle" and r["config"]["estimator"] == "mle" and len(r["std_errors_classical"]) == 3
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["estimator"] == "mle" and c["options"]["estimator"] == "mle" and c["phase"] == "finished"
    assert c["evaluations"] == r["evaluations"] and [h["phase"] for h in c["history"]][:2] == ["optimizer"] * 2
    assert "writes no checkpoints" not in done.stderr
    h = r["steps"][0]["history"]  # the results' per-iteration history, as GMM's steps have it
    assert [e["gradient_norm"] for e in h] == [e["max_abs_score"] for e in c["history"]] and h[-1]["gradient_norm"] < 1e-9
    assert [e["iteration"] for e in h] == list(range(1, len(h) + 1)) and h[-1]["phase"] == "polish"
    direct = estimate(tmp_path / "d.h5", EstimateOptions(estimator="mle"))
    np.testing.assert_allclose(r["params"], direct.params, rtol=1e-12)
    # the job again: it resumes from the finished checkpoint, without optimizing again
    again = subprocess.run([sys.executable, "-m", "estpipe", "run", str(spec)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    r2 = json.loads((tmp_path / "r.json").read_text())
    assert r2["resumed"]["evaluations_before"] == r["evaluations"] and r2["evaluations"] < r["evaluations"]
    np.testing.assert_allclose(r2["params"], r["params"], rtol=1e-12)


def test_a_user_model_by_mle_is_the_logit_reparametrized(modechoice):
    """examples/wtp_space.py (a user's model file: u = alpha (-cost + x'w)) is the logit in other
    parameters: the same maximum, and its derived b's are the logit's MLE with the logit's
    robust errors (delta method)."""
    wtp = estimate(modechoice, EstimateOptions(estimator="mle", model=str(REPO / "examples" / "wtp_space.py:WtpSpace")))
    logit = estimate(modechoice, EstimateOptions(estimator="mle"))
    assert wtp.converged and wtp.param_names[0] == "log_alpha"
    assert wtp.loglik == pytest.approx(logit.loglik, rel=1e-12)
    derived = {d.name: d for d in wtp.derived}
    for k, name in enumerate(logit.param_names):
        d = derived[f"b_{name}"]
        assert d.estimate == pytest.approx(logit.params[k], rel=1e-7, abs=1e-12)
        assert d.std_error == pytest.approx(logit.std_errors[k], rel=1e-4)


def test_panel_units_are_the_units_of_the_opg_and_of_the_file(tmp_path):
    """Sets of one decision maker are one unit: the OPG sums their scores first (against per-set
    logit scores here), and the estimate reports clustered errors over the decision makers."""
    base = _random_sets(5, n=120, missing=False)
    panel = np.repeat(np.arange(30), 4).astype(np.int64)  # 30 decision makers x 4 sets
    data = ChoiceData(X=base.X, dm=base.dm, offsets=base.offsets, chosen=base.chosen, alt=base.alt, panel=panel)
    b = np.array([-0.2, 0.5])
    s = _logit_probabilities(data.X, data.offsets, b)
    per_set = np.array([data.X[a:z][data.chosen[a:z] == 1].sum(axis=0) - s[a:z] @ data.X[a:z]
                        for a, z in zip(data.offsets[:-1], data.offsets[1:])])
    per_unit = np.add.reduceat(per_set, np.arange(0, 120, 4), axis=0)
    got = PartitionKernel(data, model="logit", tile_rows=10).evaluate(Request.for_likelihood(b))
    np.testing.assert_allclose(got.opg, per_unit.T @ per_unit, rtol=1e-12)
    assert got.n_units == 30
    path = tmp_path / "p.h5"
    write_choice_data(path, data, ["x1", "x2"], ["m1", "m2", "m3"], alt_names=[f"a{j + 1}" for j in range(5)])
    r = estimate(path, EstimateOptions(estimator="mle"))
    assert (r.se_type, r.units, r.n_clusters, r.likelihood["n_units"]) == ("clustered", "panel units", 30, 30)
    assert r.likelihood["bic"] == pytest.approx(2 * np.log(30) - 2 * r.loglik)


# -- optimizers (issue 11, item 4) and the one Hessian at the end

MLE_OPTIMIZER_NAMES = ("bfgs", "l-bfgs-b", "bhhh", "trust-newton")


def test_the_registry_names_the_optimizers_tested():
    from estpipe.estimation.mle import DEFAULT_OPTIMIZER, MLE_OPTIMIZERS
    assert MLE_OPTIMIZERS.names == MLE_OPTIMIZER_NAMES and DEFAULT_OPTIMIZER in MLE_OPTIMIZERS


@pytest.fixture(scope="module")
def nested_file(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("nl") / "n.h5", seed=5, n=1500)


@pytest.mark.parametrize("which", ["logit", "nested-logit"])
def test_every_optimizer_reaches_the_same_estimate(which, modechoice, nested_file):
    path, extra = (modechoice, {}) if which == "logit" else (nested_file, {"model": "nested-logit", "nests": NESTS})
    runs = {name: estimate(path, EstimateOptions(estimator="mle", optimizer=name, **extra))
            for name in MLE_OPTIMIZER_NAMES}
    base = runs["bfgs"]
    assert base.to_dict()["config"]["optimizer"] == "bfgs"
    for name, r in runs.items():
        assert r.converged, (name, r.to_dict()["steps"][0]["message"])
        assert r.to_dict()["steps"][0]["message"].startswith(f"{name}: ")  # the optimizer asked for ran
        np.testing.assert_allclose(r.params, base.params, rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(r.std_errors, base.std_errors, rtol=1e-6, err_msg=name)
        assert r.loglik == pytest.approx(base.loglik, rel=1e-12)


def _mle_direct(path, optimizer, fast=False):
    """estimate_mle on a PartitionKernel over the whole file, to read its Hessian count
    (fast=False: the generic strategy, whose Hessian is central differences of the score)."""
    from types import SimpleNamespace

    from estpipe.estimation.mle import MleSettings, estimate_mle
    with ChoiceDataFile(path) as f:
        data = f.read_sets(0, f.n_sets)
        x_names = list(f.x_names)
    model = get_model("logit")
    problem = SimpleNamespace(has_chosen=True, x_names=x_names, has_panel=False, path=str(path))
    P = len(model.param_names(x_names))
    est = estimate_mle(PartitionKernel(data, model=model, fast=fast), problem, model, MleSettings(optimizer=optimizer),
                       np.zeros(P), clustered=False)
    return est, P


@pytest.mark.parametrize("optimizer", ["bfgs", "bhhh"])
def test_the_hessian_is_computed_once_at_the_end(modechoice, optimizer):
    est, P = _mle_direct(modechoice, optimizer)
    assert est.converged and est.hessian_evaluations == P  # forward differences from the last point
    # what the first slice paid: a Hessian (2P) at the optimizer's point and after each of its
    # Newton steps (it took >= 1 from a BFGS point): at least 2 * 2P on top of the optimizer's own
    without_hessian = est.evaluations - est.hessian_evaluations
    assert est.evaluations < without_hessian + 2 * (2 * P)
    assert np.all(np.isfinite(est.covariance)) and np.all(np.diag(est.covariance) > 0)


def test_the_textbook_logit_has_an_exact_hessian_in_one_evaluation(modechoice):
    exact, P = _mle_direct(modechoice, "bfgs", fast=True)
    central, _ = _mle_direct(modechoice, "bfgs", fast=False)
    assert exact.hessian_evaluations == 1 and "Hessian (exact) 1 evaluation" in exact.message, exact.message
    assert central.hessian_evaluations == P and "forward differences" in central.message
    np.testing.assert_allclose(exact.params, central.params, rtol=1e-9)
    for kind in ("classical", "robust"):  # forward differences: ~1e-8 of the largest entry
        cov = exact.covariances[kind]
        np.testing.assert_allclose(cov, central.covariances[kind], rtol=1e-6, atol=1e-6 * np.abs(cov).max())
    # trust-newton takes the exact one at every iterate: one evaluation each
    trust, _ = _mle_direct(modechoice, "trust-newton", fast=True)
    assert trust.converged and trust.hessian_evaluations <= trust.steps[0].iterations + 1
    np.testing.assert_allclose(trust.params, exact.params, rtol=1e-8)


def test_trust_newton_reuses_its_hessian_at_the_solution(modechoice):
    est, P = _mle_direct(modechoice, "trust-newton")
    iterations = est.steps[0].iterations
    assert est.converged and est.hessian_evaluations % P == 0
    # trust-exact evaluates its Hessian at most once per iterate; none is added at the end
    assert "0 BHHH polish steps" in est.message and "(the optimizer's own at the end)" in est.message, est.message
    assert est.hessian_evaluations <= (P + 1) * (iterations + 1)  # P steps, and g where not memoized


def test_optimizer_refusals_are_one_line(modechoice):
    line = estimate_error_line(modechoice, ["--estimator", "mle", "--optimizer", "bhhh", "--derivatives", "adjoint"],
                               "logit")
    assert line.startswith("estpipe: error: --derivatives adjoint: --optimizer bhhh needs the score of every unit"), line
    assert line.endswith("leave --derivatives at dual"), line
    line = estimate_error_line(modechoice, ["--estimator", "mle", "--optimizer", "bhh"], "logit")
    assert "unknown optimizer 'bhh'" in line and "did you mean 'bhhh'" in line, line
    line = estimate_error_line(modechoice, ["--estimator", "mle", "--optimizer", "gauss-newton"], "logit")
    assert "gauss-newton is an optimizer of --estimator gmm" in line and "bhhh" in line, line
    line = estimate_error_line(modechoice, ["--optimizer", "trust-newton"], "logit")
    assert "trust-newton is an optimizer of --estimator mle" in line and "gauss-newton" in line, line


def test_the_mle_does_not_read_dm(tmp_path):
    """A likelihood needs X and the chosen rows only: dm is never read, so a NaN in it, which
    GMM refuses in one line, does not stop the MLE, and the partitions hold no dm."""
    from estpipe.data.problem import read_problem
    from estpipe.execution.tasks import PartitionSource, load_partition

    d = _random_sets(7, n=300, missing=False)
    dm = d.dm.copy()
    dm[3, 1] = np.nan
    path = tmp_path / "nan_dm.h5"
    write_choice_data(path, ChoiceData(X=d.X, dm=dm, offsets=d.offsets, chosen=d.chosen), ["x1", "x2"],
                      ["m1", "m2", "m3"])
    line = estimate_error_line(path, [], "logit")
    assert "dataset dm" in line and "NaN" in line, line
    r = estimate(path, EstimateOptions(estimator="mle"))
    assert r.converged and np.all(np.isfinite(r.std_errors))
    problem = read_problem(path)
    part = load_partition(PartitionSource.of(problem, "logit", "dual", moments=False), 0, problem.n_sets)
    assert part.kernel.data.dm.shape == (problem.n_rows, 0)
    assert PartitionSource.of(problem, "logit", "dual", moments=False).key(0, 5) != \
        PartitionSource.of(problem, "logit", "dual").key(0, 5)


def test_se_chooses_the_reported_standard_errors(modechoice):
    from estpipe.data.format import read_choice_data

    runs = {se: estimate(modechoice, EstimateOptions(estimator="mle", se=se)) for se in ("robust", "classical", "bhhh")}
    assert [r.se_type for r in runs.values()] == ["robust", "classical", "bhhh"]
    np.testing.assert_array_equal(runs["classical"].std_errors, runs["robust"].std_errors_of("classical"))
    # bhhh: the inverse of the OPG sum_i s_i s_i' at the estimate, computed here from the kernel's sums
    b = runs["bhhh"].params
    opg = PartitionKernel(read_choice_data(modechoice), model="logit").evaluate(Request.for_likelihood(b)).opg
    np.testing.assert_allclose(runs["bhhh"].std_errors, np.sqrt(np.diag(np.linalg.inv(opg))), rtol=1e-10)
    # --se bhhh makes no Hessian: the inverse OPG alone (as xlogit reports), fewer evaluations
    assert runs["bhhh"].evaluations < runs["robust"].evaluations and "no Hessian (--se bhhh)" in runs["bhhh"].message
    assert runs["bhhh"].to_dict()["std_errors_classical"] is None and list(runs["bhhh"].covariances) == ["bhhh"]
    assert "classical beside them" not in runs["bhhh"].table() and "classical beside them" in runs["robust"].table()
    # z and intervals follow the chosen errors
    d = runs["bhhh"].to_dict()
    np.testing.assert_allclose(np.array(d["z"]), b / runs["bhhh"].std_errors, rtol=1e-12)
    line = estimate_error_line(modechoice, ["--estimator", "mle", "--se", "bhh"], "logit")
    assert "--se 'bhh' is not one of robust, classical, bhhh (did you mean 'bhhh'?)" in line
    line = estimate_error_line(modechoice, ["--se", "classical"], "logit")
    assert "--se chooses among the standard errors of --estimator mle" in line


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fused_logit_likelihood_is_the_generic_one_in_every_mode(seed):
    """The textbook logit's likelihood by hand (kernel/likelihood.py fused_logit_likelihood_tile)
    equals the dual blocks of its log-probabilities, with and without the score and the OPG,
    across tiles, threads, missing alternatives and clusters."""
    d = _random_sets(seed, n=90, missing=seed == 0)  # sets of varying size, then all of one size
    b = np.array([0.7, -1.1])
    fused = PartitionKernel(d, model="logit", tile_rows=37, threads=2)
    generic = PartitionKernel(d, model="logit", fast=False, tile_rows=37, threads=2)
    assert type(fused.strategy).__name__ == "FusedLogit" and type(generic.strategy).__name__ == "GenericDual"
    for score, opg in ((True, True), (True, False), (False, False)):
        a = fused.evaluate(Request.for_likelihood(b, score=score, opg=opg))
        g = generic.evaluate(Request.for_likelihood(b, score=score, opg=opg))
        np.testing.assert_allclose(a.loglik, g.loglik, rtol=1e-13)
        assert a.n_units == g.n_units == 90 and a.n_clusters == g.n_clusters == 30
        assert (a.score is None) == (not score) and (a.opg is None) == (not opg)
        if score:
            np.testing.assert_allclose(a.score, g.score, rtol=1e-12, atol=1e-13)
        if opg:
            np.testing.assert_allclose(a.opg, g.opg, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(a.opg_cluster, g.opg_cluster, rtol=1e-12, atol=1e-13)
    # with a seed scale, partials are with respect to beta = scale * b
    scale = np.array([4.0, 0.5])
    a = fused.evaluate(Request.for_likelihood(b, seed_scale=scale))
    g = fused.evaluate(Request.for_likelihood(b))
    np.testing.assert_allclose(a.score, g.score / scale, rtol=1e-14)


def test_the_memory_check_of_an_mle_counts_no_dm(tmp_path):
    """dm is not loaded for a likelihood, so the memory check does not count it: a file whose X
    fits and whose dm would not passes for --estimator mle and is refused for GMM."""
    import h5py

    from estpipe.data.problem import read_problem
    from estpipe.errors import UserError
    from estpipe.execution.memory import MemoryPool, check_memory
    from estpipe.execution.planning import plan_partitions

    n_sets, J, M = 1000, 100_000, 40  # 1e8 rows: X 0.8 GB, dm 32 GB (unwritten chunks: a small file)
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("offsets", data=np.arange(n_sets + 1, dtype=np.int64) * J)
        f.create_dataset("X", (n_sets * J, 1), dtype="f8", chunks=(65536, 1))
        f.create_dataset("dm", (n_sets * J, M), dtype="f8", chunks=(4096, M))
        for k, v in dict(estpipe_format="choice-data", estpipe_format_version=1, n_sets=n_sets, n_rows=n_sets * J,
                         n_params=1, n_moments=M, param_names=["a"], moment_names=[f"m{i}" for i in range(M)],
                         provenance="{}").items():
            f.attrs[k] = v
    problem = read_problem(path)
    parts = plan_partitions(problem.offsets, 1)
    pools = [MemoryPool("this process", 4 * 2**30, (0,), "use a machine with more memory")]
    kw = dict(model="logit", derivatives="dual", threads=1, new_processes=False)
    plan = check_memory(problem, parts, [0], pools, moments=False, **kw)
    assert plan.data_bytes < 2**30
    with pytest.raises(UserError, match="will not fit in memory"):
        check_memory(problem, parts, [0], pools, moments=True, **kw)


class _FlatValley:
    """-loglik/n of a likelihood nearly flat along theta_2 (its OPG ~ 0 there): f = 1 + 1e-9 theta_1
    + 1e-27 theta_2 + theta_2^2, with B = diag(1, 1e-40). BHHH's direction -B^-1 g has a tiny
    predicted decrease (below f's rounding) yet a step of 1e13 along theta_2."""

    def value(self, theta):
        return 1.0 + 1e-9 * theta[0] + 1e-27 * theta[1] + theta[1] ** 2

    def gradient(self, theta):
        return np.array([1e-9, 1e-27 + 2 * theta[1]])

    def opg(self, theta):
        return np.diag([1.0, 1e-40])


def test_bhhh_never_takes_a_step_that_worsens_the_likelihood_beyond_its_rounding():
    """Found on the modechoice mixed logit at 200 draws, where the polish took a step of 4e51 that
    made -loglik 2e54: a full step below f's rounding is taken only if f stays within it."""
    from estpipe.estimation.mle import Bhhh

    theta, iterations, ok, message = Bhhh().minimize(_FlatValley(), np.zeros(2), gtol=1e-12, max_iter=5)
    assert not ok and iterations == 0 and np.array_equal(theta, np.zeros(2)), (theta, message)
    assert "rounding" in message


def test_a_flat_simulated_likelihood_suggests_more_draws():
    """The one line for a Hessian that is not negative definite names the parameters; for a
    simulated likelihood it also suggests more draws (the modechoice mixed logit at 200 Halton
    draws ran off to such a point, where 100, 300, 500 and 1000 draws converge)."""
    from estpipe.errors import UserError
    from estpipe.estimation.mle import _inverse_negative

    H = -np.diag([2.0, 1.0, 0.0])
    for simulated in (False, True):
        with pytest.raises(UserError) as err:
            _inverse_negative(H, ["a", "b", "sd_c"], "the estimate", simulated)
        line = str(err.value)
        assert "\n" not in line and "sd_c" in line.split("identify")[1].split(";")[0]
        assert ("draws" in line) == simulated, line
