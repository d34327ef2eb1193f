"""The nested logit: its fused kernel against its reference (dual operations over groups of rows),
derivatives against complex step and central differences, lambda = 1 is the logit, the RU2
probabilities against the simulate design's independent formula, tiles, threads, partitions and
dask workers change nothing, recovery on simulated data, which instruments identify lambda, and
its bad input through the real CLI."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import estimate_error_line
from estpipe.data.format import ChoiceData, write_choice_data
from estpipe.data.simulate_models import nested_logit_log_probabilities
from estpipe.dual import Workspace, seed
from estpipe.errors import UserError
from estpipe.kernel import PartitionKernel
from estpipe.kernel.tiles import TileData
from estpipe.models import MODELS, get_model
from estpipe.estimation.gmm import Reporter
from estpipe.orchestration import EstimateOptions, estimate


class Facts:
    def __init__(self, K, alt_names):
        self.x_names = [f"x{k + 1}" for k in range(K)]
        self.alt_names = list(alt_names)
        self.has_panel = False


@st.composite
def nested_problems(draw):
    """Random K, alternatives, nests (some of one alternative, some alternatives in none), sets
    holding random subsets of the alternatives (missing ones), listed in random order (a nest's
    rows not adjacent) or in alternative order, and parameters with lambdas in (0.2, 2)."""
    K = draw(st.integers(1, 3))
    J = draw(st.integers(2, 6))
    names = [f"a{j + 1}" for j in range(J)]
    labels = draw(st.lists(st.integers(-1, 2), min_size=J, max_size=J))  # -1: in no nest
    nests = [[names[j] for j in range(J) if labels[j] == k] for k in range(3)]
    text = "; ".join(f"n{k + 1}={','.join(a)}" for k, a in enumerate(nests) if a)
    if not text:
        labels[0] = 0
        text = f"n1={names[0]}"
    scrambled = draw(st.booleans())
    seed_ = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed_)
    n_sets = draw(st.integers(2, 12))
    alts = []
    for _ in range(n_sets):
        present = np.sort(rng.choice(J, rng.integers(1, J + 1), replace=False))
        alts.append(rng.permutation(present) if scrambled else present)
    sizes = [len(a) for a in alts]
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    rows = int(offsets[-1])
    chosen = np.zeros(rows, dtype=np.int8)
    chosen[offsets[:-1] + rng.integers(0, sizes)] = 1
    data = ChoiceData(X=rng.standard_normal((rows, K)), dm=rng.standard_normal((rows, 4)), offsets=offsets,
                      chosen=chosen, alt=np.concatenate(alts).astype(np.int32))
    model = get_model("nested-logit").bind(Facts(K, names), nests=text)
    P = model.n_params(K)
    params = np.r_[rng.uniform(-1, 1, K), np.log(rng.uniform(0.2, 2.0, P - K))]
    return data, model, params


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=nested_problems(), tile_rows=st.integers(3, 40))
def test_fused_equals_reference_complex_step_and_central_differences(problem, tile_rows):
    data, model, params = problem
    fused = PartitionKernel(data, model=model, tile_rows=tile_rows)
    reference = PartitionKernel(data, model=model, fast=False, tile_rows=tile_rows)
    assert fused.strategy.name == "fused-nested-logit" and reference.strategy.name == "generic-dual"
    a, r = fused.sums(params, covariance=True), reference.sums(params, covariance=True)
    scale = np.abs(r.gG).max()
    np.testing.assert_allclose(a.gG, r.gG, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(a.hh, r.hh, rtol=1e-12, atol=1e-12 * np.abs(r.hh).max())
    np.testing.assert_allclose(a.loglik, r.loglik, rtol=1e-12, atol=1e-14 * data.n_rows)  # sets of one: log 1 = 0 rounds
    seed_scale = np.exp(np.linspace(-1, 1, len(params)))
    v = np.linspace(-1, 1, data.M)
    np.testing.assert_allclose(fused.pullback(params, v, seed_scale=seed_scale),
                               reference.pullback(params, v, seed_scale=seed_scale), rtol=1e-11, atol=1e-12 * scale)
    G = a.G
    step = np.empty_like(G)
    for k in range(len(params)):
        z = params.astype(complex)
        z[k] += 1e-30j
        step[:, k] = reference.sums(z, jacobian=False).g.imag / 1e-30
    # atol 1e-12 max|G|, or of the terms that cancel when G is 0 exactly (every set of one
    # alternative: the complex step gives 0, the closed form rounding of |dm x|)
    floor = np.abs(data.dm).max() * max(1.0, np.abs(data.X).max())
    np.testing.assert_allclose(G, step, rtol=1e-12, atol=1e-12 * max(np.abs(G).max(), 1e-3 * floor))
    central = np.empty_like(G)
    for k in range(len(params)):
        e = np.zeros(len(params))
        e[k] = 1e-6
        central[:, k] = (fused.sums(params + e, jacobian=False).g - fused.sums(params - e, jacobian=False).g) / 2e-6
    np.testing.assert_allclose(G, central, rtol=0, atol=1e-6 * max(1.0, np.abs(G).max()))


def _data(seed=1, n=200, J=5, K=3, scrambled=False):
    rng = np.random.default_rng(seed)
    alt = np.concatenate([rng.permutation(J) if scrambled else np.arange(J) for _ in range(n)]).astype(np.int32)
    chosen = np.zeros(n * J, dtype=np.int8)
    chosen[np.arange(n) * J + rng.integers(0, J, n)] = 1
    return ChoiceData(X=rng.standard_normal((n * J, K)), dm=rng.standard_normal((n * J, 6)),
                      offsets=np.arange(0, n * J + 1, J, dtype=np.int64), chosen=chosen, alt=alt)


NAMES5 = ["a1", "a2", "a3", "a4", "a5"]


@pytest.mark.parametrize("scrambled", [False, True], ids=["in-order", "scrambled"])
def test_every_lambda_at_one_is_the_logit(scrambled):
    data = _data(scrambled=scrambled)
    b = np.array([0.4, -0.3, 0.8])
    model = get_model("nested-logit").bind(Facts(3, NAMES5), nests="n1=a1,a3; n2=a2,a4,a5")
    logit = PartitionKernel(data, model="logit").sums(b, covariance=True)
    for fast in (True, False):
        nested = PartitionKernel(data, model=model, fast=fast).sums(np.r_[b, 0.0, 0.0], covariance=True)
        np.testing.assert_allclose(nested.g, logit.g, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(nested.G[:, :3], logit.G, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(nested.hh, logit.hh, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(nested.loglik, logit.loglik, rtol=1e-13)
    # and away from 1 it is not the logit
    assert np.abs(PartitionKernel(data, model=model).sums(np.r_[b, -0.5, 0.0]).g - logit.g).max() > 1e-3


def test_probabilities_equal_the_simulate_designs_formula():
    """The model's RU2 log probabilities (dual operations over groups) against the independent
    formula the simulate design draws from (data/simulate_models.py), on sets with missing
    alternatives; and the probabilities sum to 1 in every set."""
    rng = np.random.default_rng(3)
    J, K, n = 6, 2, 50
    alts = [np.sort(rng.choice(J, rng.integers(1, J + 1), replace=False)) for _ in range(n)]
    sizes = np.array([len(a) for a in alts])
    alt = np.concatenate(alts).astype(np.int32)
    X = rng.standard_normal((len(alt), K))
    model = get_model("nested-logit").bind(Facts(K, [f"a{j + 1}" for j in range(J)]), nests="n1=a1,a2,a3; n2=a4,a5")
    lam = np.array([0.4, 0.7, 1.0])  # a6 is in no nest: its own, lambda 1
    params = np.r_[0.9, -1.4, np.log(lam[:2])]
    from estpipe.dual import Segments

    tile = TileData(X=X, seg=Segments(np.r_[0, np.cumsum(sizes)]), alt=alt, unit=np.arange(n))
    logp = model.log_probabilities(seed(params, Workspace(), 0, 0), tile).value
    nest = np.array([0, 0, 0, 1, 1, 2])[alt]
    np.testing.assert_allclose(logp, nested_logit_log_probabilities(X @ params[:K], nest, lam, sizes), rtol=1e-12,
                               atol=1e-12)
    p = model.probabilities(seed(params, Workspace(), 0, 0), tile).value
    np.testing.assert_allclose(np.add.reduceat(p, tile.seg.starts), 1.0, rtol=1e-14)
    np.testing.assert_allclose(np.log(p), logp, rtol=1e-12, atol=1e-15)  # a set of one: log p = 0


def test_tiles_threads_and_kernel_partitions_do_not_change_the_sums():
    data = _data(seed=4, n=300, scrambled=True)
    model = get_model("nested-logit").bind(Facts(3, NAMES5), nests="n1=a1,a3; n2=a2,a4")
    p = np.array([0.4, -0.3, 0.8, -0.6, 0.2])
    base = PartitionKernel(data, model=model, tile_rows=100_000, threads=1).sums(p, covariance=True)
    for tile_rows, threads in ((7, 1), (64, 2), (501, 2)):
        s = PartitionKernel(data, model=model, tile_rows=tile_rows, threads=threads).sums(p, covariance=True)
        np.testing.assert_allclose(s.gG, base.gG, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(s.hh, base.hh, rtol=1e-12, atol=1e-13)
    # two partitions' sums add to the whole
    cut = 137
    r = int(data.offsets[cut])
    halves = [ChoiceData(X=data.X[:r], dm=data.dm[:r], offsets=data.offsets[: cut + 1], alt=data.alt[:r]),
              ChoiceData(X=data.X[r:], dm=data.dm[r:], offsets=data.offsets[cut:] - r, alt=data.alt[r:], first_set=cut)]
    total = sum(PartitionKernel(h, model=model).sums(p).gG for h in halves)
    np.testing.assert_allclose(total, base.gG, rtol=1e-12, atol=1e-13)


def test_the_model_and_its_options():
    m = get_model("nested-logit").bind(Facts(2, ["train", "bus", "car", "air"]), nests="public=train,bus; private=car")
    assert "nested-logit" in MODELS and m.needs == {"alt"}
    assert m.param_names(["cost", "time"]) == ["cost", "time", "log_lambda_public"]  # private has one alternative
    assert m.param_columns(2) == [0, 1, None]
    assert list(m.start(2)) == [0.0, 0.0, 0.0]
    assert m.derived(np.array([1.0, 2.0, np.log(0.5)])) == pytest.approx({"lambda_public": 0.5})
    assert m.derived_nulls() == {"lambda_public": 1.0}
    assert m.derived_notes({"lambda_public": 0.5}) == []
    (note,) = m.derived_notes({"lambda_public": 1.7})
    assert "lambda_public = 1.7 > 1" in note and "not consistent with utility maximization" in note


@pytest.mark.parametrize(("nests", "expected"), [
    pytest.param("public=train,bus; private=cart", "nest private names 'cart', which is not an alternative of the file; "
                 "its alternatives are: train, bus, car, air", id="unknown-alternative"),
    pytest.param("public=train,bus; private=car,bus", "the alternative bus is in nests public and private", id="in-two-nests"),
    pytest.param("public=train,train", "the alternative train is twice in nest public", id="twice-in-one-nest"),
    pytest.param("public=train; public=bus", "the nest public is named twice", id="nest-named-twice"),
    pytest.param("train,bus", "'train,bus' is not name=alternatives", id="no-name"),
    pytest.param(" ; ", "names no nest", id="empty"),
])
def test_bad_nests_are_one_line(nests, expected):
    with pytest.raises(UserError) as info:
        get_model("nested-logit").bind(Facts(2, ["train", "bus", "car", "air"]), nests=nests)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_refused_without_alternative_ids_or_nests():
    facts = Facts(2, [])
    facts.alt_names = None
    with pytest.raises(UserError, match="estpipe load --alt-col"):
        get_model("nested-logit").bind(facts, nests="a=b,c")
    with pytest.raises(UserError, match="needs nests"):
        get_model("nested-logit").bind(Facts(2, ["a", "b"]))
    with pytest.raises(UserError, match="takes no random"):
        get_model("nested-logit").bind(Facts(2, ["a", "b"]), nests="n=a,b", random="x1")


# -- simulated data: recovery, identification, back ends ---------------------------------------------

B_TRUE, LAMBDA_TRUE = (1.0, -1.0), (0.5, 0.7)
NESTS = "n1=a1,a2,a3; n2=a4,a5,a6"


def _simulate(path, seed, n=3000, instruments=("dummies", "others"), missing=True):
    """RU2 nested logit, J = 6 alternatives a1..a6 in nests n1 = a1..a3, n2 = a4..a6 (lambda 0.5,
    0.7), x ~ N(0, 1), b = (1, -1); with `missing`, each set holds 3 to 6 of the alternatives.
    Instruments z: x, then "dummies" x_k d_n1 (x interacted with the nest dummies but the last:
    the dummies sum to 1), then "others" the sum of x_k over the other alternatives of the same
    nest in the set. dm = z - z_chosen."""
    rng = np.random.default_rng(seed)
    J, K = 6, 2
    nest_of_alt = np.repeat([0, 1], 3)
    alts = [np.sort(rng.choice(J, rng.integers(3, J + 1), replace=False)) if missing else np.arange(J) for _ in range(n)]
    sizes = np.array([len(a) for a in alts])
    alt = np.concatenate(alts).astype(np.int32)
    offsets = np.r_[0, np.cumsum(sizes)]
    X = rng.standard_normal((len(alt), K))
    lam = np.array(LAMBDA_TRUE)
    logp = nested_logit_log_probabilities(X @ np.array(B_TRUE), nest_of_alt[alt], lam, sizes)
    cum = np.cumsum(np.exp(logp))
    before = np.r_[0.0, cum][offsets[:-1]]
    u = rng.random(n) * (cum[offsets[1:] - 1] - before) + before
    pick = np.minimum(np.searchsorted(cum, u), offsets[1:] - 1)
    chosen = np.zeros(len(alt), dtype=np.int8)
    chosen[pick] = 1
    cols, names = [X], ["x1", "x2"]
    key = np.repeat(np.arange(n), sizes) * 2 + nest_of_alt[alt]
    if "dummies" in instruments:
        for k in range(K):
            cols.append((X[:, k] * (nest_of_alt[alt] == 0))[:, None])
            names.append(f"x{k + 1}*d_n1")
    if "others" in instruments:
        for k in range(K):
            cols.append((np.bincount(key, X[:, k], minlength=2 * n)[key] - X[:, k])[:, None])
            names.append(f"others_x{k + 1}")
    Z = np.column_stack(cols)
    dm = Z - np.repeat(Z[chosen == 1], sizes, axis=0)
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen, alt=alt), ["x1", "x2"], names,
                      alt_names=[f"a{j + 1}" for j in range(J)], truth=np.r_[B_TRUE, np.log(lam)],
                      truth_names=["x1", "x2", "log_lambda_n1", "log_lambda_n2"])
    return path


def _nested(path, **kw):
    """The nested logit from a first logit fit's b and lambda = 1 (from b = 0 every utility is 0, where
    the moments hardly see lambda and a Gauss-Newton step can leave for lambda -> 0 or infinity)."""
    logit = estimate(path, EstimateOptions(model="logit", steps=1))
    return estimate(path, EstimateOptions(model="nested-logit", nests=NESTS, start=list(logit.params) + [0.0, 0.0], **kw))


def test_recovers_the_truth_and_reports_lambda(tmp_path):
    r = _nested(_simulate(tmp_path / "n.h5", seed=11))
    assert r.converged and r.param_names == ["x1", "x2", "log_lambda_n1", "log_lambda_n2"]
    z = (r.params - np.r_[B_TRUE, np.log(LAMBDA_TRUE)]) / r.std_errors
    assert np.all(np.abs(z) < 4), z
    derived = {d.name: d for d in r.derived}
    for name, lam, theta, se in zip(("lambda_n1", "lambda_n2"), LAMBDA_TRUE, r.params[2:], r.std_errors[2:]):
        d = derived[name]
        assert d.estimate == pytest.approx(np.exp(theta)) and d.null == 1.0
        assert d.std_error == pytest.approx(np.exp(theta) * se, rel=1e-4)  # the delta method
        assert abs(d.estimate - lam) < 4 * d.std_error


def test_the_default_start_is_a_logit_fit(tmp_path):
    """Without --start, the coefficients start from a one-step logit GMM run on the nested model's
    own evaluator at lambda = 1 (estimation.gmm.logit_start): the same start, and so the same
    estimate, as a separate logit fit given as --start; and it says so in the log."""
    path = _simulate(tmp_path / "n.h5", seed=11)
    lines = []

    class Log(Reporter):
        def log(self, message):
            lines.append(message)

    default = estimate(path, EstimateOptions(model="nested-logit", nests=NESTS), reporter=Log())
    explicit = _nested(path)
    assert default.converged
    np.testing.assert_allclose(default.params, explicit.params, rtol=1e-7, atol=1e-9)
    assert any(line.startswith("start: the coefficients of a one-step logit fit") for line in lines), lines


def test_which_instruments_identify_lambda(tmp_path):
    """z = x alone: M = 2 moments for 4 parameters, refused. x and x interacted with the nest
    dummies (M = P = 4): lambda barely identified here: the fit wanders off (one lambda towards 0
    on this machine, where it does not converge), and at least one lambda's standard error is
    orders of magnitude that of the next case (which one, and by how much, depends on where the
    wandering fit stops, which rounding decides: CI's machine and this one differ). Adding the attributes of the other alternatives of the same
    nest: lambda recovered within 4 standard errors, which are small."""
    with pytest.raises(UserError, match=r"M = 2 moments for 4 parameters"):
        estimate(_simulate(tmp_path / "x.h5", seed=5, instruments=()), EstimateOptions(model="nested-logit", nests=NESTS))
    weak = _nested(_simulate(tmp_path / "d.h5", seed=5, instruments=("dummies",)))
    strong = _nested(_simulate(tmp_path / "o.h5", seed=5))
    assert strong.converged
    truth = np.r_[B_TRUE, np.log(LAMBDA_TRUE)]
    assert np.all(np.abs(strong.params - truth) < 4 * strong.std_errors)
    assert np.all(strong.std_errors[2:] < 0.5)
    ratio = weak.std_errors[2:] / strong.std_errors[2:]
    assert np.nanmax(ratio) > 100, (weak.params, weak.std_errors, strong.std_errors)
    assert np.all(ratio > 3), (weak.params, weak.std_errors, strong.std_errors)


def test_partitions_and_dask_workers_give_the_in_process_estimate(tmp_path):
    path = _simulate(tmp_path / "n.h5", seed=2, n=1500)
    start = list(estimate(path, EstimateOptions(model="logit", steps=1)).params) + [0.0, 0.0]

    def run(**kw):
        return estimate(path, EstimateOptions(model="nested-logit", nests=NESTS, start=start, **kw))

    base = run()
    for other in (run(partitions=3), run(workers=2, partitions=4)):
        np.testing.assert_allclose(other.params, base.params, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(other.std_errors, base.std_errors, rtol=1e-9)


# -- bad input through the CLI ---------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    pytest.param(["--nests", "n1=a1,a2,a9"], "--nests: nest n1 names 'a9', which is not an alternative of the file; "
                 "its alternatives are: a1, a2, a3, a4, a5, a6", id="unknown-alternative"),
    pytest.param(["--nests", "n1=a1,a2; n2=a2,a3"], "--nests: the alternative a2 is in nests n1 and n2", id="in-two-nests"),
    pytest.param(["--nests", "n1:a1,a2"], "--nests: 'n1:a1,a2' is not name=alternatives", id="malformed"),
    pytest.param([], "model nested-logit needs --nests", id="no-nests"),
    pytest.param(["--nests", NESTS, "--random", "x1"], "model nested-logit takes no --random", id="random"),
    pytest.param(["--nests", NESTS, "--no-alt"], "estpipe load --alt-col", id="no-alternative-ids"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    if "--no-alt" in args:
        args = [a for a in args if a != "--no-alt"]
        rng = np.random.default_rng(0)
        X = rng.standard_normal((60, 2))
        path = tmp_path / "plain.h5"
        write_choice_data(path, ChoiceData(X=X, dm=X.copy(), offsets=np.arange(0, 61, 3)), ["x1", "x2"], ["z1", "z2"])
    else:
        path = _simulate(tmp_path / "n.h5", seed=1, n=200)
    assert expected in estimate_error_line(path, args, "nested-logit")


def test_inference_over_40_data_sets(tmp_path):
    """Over 40 simulated data sets (the default start: a logit fit), the 95% intervals of every
    parameter cover at a binomially consistent rate and the spread of the estimates matches the
    mean standard error (the sd/se check of tests/test_gmm_statistics.py). At 10,000 sets: at
    3,000 the estimates of log lambda_n1 have a heavy left tail (two of 40 below -3, standard
    errors of 35 and 1,215), so the normal approximation needs the larger samples."""
    estimates, ses = [], []
    for seed in range(40):
        path = _simulate(tmp_path / f"n{seed}.h5", seed=200 + seed, n=10000)
        r = estimate(path, EstimateOptions(model="nested-logit", nests=NESTS))
        assert r.converged, (seed, r.message)
        estimates.append(r.params)
        ses.append(r.std_errors)
        path.unlink()
    estimates, ses = np.array(estimates), np.array(ses)
    truth = np.r_[B_TRUE, np.log(LAMBDA_TRUE)]
    cover = (np.abs(estimates - truth) <= 1.96 * ses).mean(axis=0)
    # 40 draws of a 95% coverage: below 0.80 has probability < 0.1% per parameter
    assert np.all(cover >= 0.80), cover
    ratio = estimates.std(axis=0, ddof=1) / ses.mean(axis=0)
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
