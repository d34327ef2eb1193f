"""The partition kernel: fast == generic == reference, tiling, chunks, splits, S, reverse mode."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from estpipe import logit_moments
from estpipe.data.format import ChoiceData
from estpipe.errors import UserError
from estpipe.kernel import PartitionKernel, logit_sums_reference


def make_data(sizes, K=4, M=6, seed=0, scale=1.0, clusters=None):
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    rows = int(offsets[-1])
    X = scale * rng.standard_normal((rows, K))
    dm = rng.standard_normal((rows, M))
    chosen = np.zeros(rows, dtype=np.int8)
    chosen[offsets[:-1] + rng.integers(0, np.asarray(sizes))] = 1
    cluster = None if clusters is None else np.repeat(np.arange(len(sizes)), 1)[: len(sizes)] // clusters
    return ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen, cluster=cluster), rng.standard_normal(K)


SHAPES = {
    "equal-sets": [5] * 24,
    "unequal-sets": list(np.random.default_rng(3).integers(1, 9, size=30)),
    "singleton-sets": [1, 3, 1, 1, 4, 2, 1],
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_sums_match_reference(shape, fast):
    data, b = make_data(SHAPES[shape], clusters=3)
    ref = logit_sums_reference(b, data.X, data.dm, data.offsets, chosen=data.chosen, cluster=data.cluster)
    out = PartitionKernel(data, tile_rows=11, fast=fast).sums(b, covariance=True)
    np.testing.assert_allclose(out.gG, ref.gG, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.S, ref.S, rtol=1e-12, atol=1e-12)
    assert out.n_units == ref.n_units and out.nn == ref.nn
    assert out.loglik == pytest.approx(ref.loglik, rel=1e-12)


@pytest.mark.parametrize("clustered", [True, False], ids=["clustered", "not-clustered"])
@pytest.mark.parametrize("cluster_size", [1, 4, 7], ids=["cluster-1", "cluster-4", "cluster-7"])
@pytest.mark.parametrize("tile_rows", [1, 9, 1000], ids=["tile-1", "tile-9", "tile-1000"])
def test_covariance_sums_match_reference(clustered, cluster_size, tile_rows):
    data, b = make_data(SHAPES["unequal-sets"], clusters=cluster_size)
    ref = logit_sums_reference(b, data.X, data.dm, data.offsets, cluster=data.cluster if clustered else None)
    out = PartitionKernel(data, tile_rows=tile_rows).sums(b, jacobian=False, covariance=True, clustered=clustered)
    np.testing.assert_allclose(out.hh, ref.hh, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.nh, ref.nh, rtol=1e-12, atol=1e-12)
    assert out.nn == ref.nn and out.n_units == ref.n_units
    assert out.n_units == (-(-30 // cluster_size) if clustered else 30)


@pytest.mark.parametrize("model", ["logit", "logit-signed"])
@pytest.mark.parametrize("tile_rows, chunk", [(5, 1), (5, 3), (12, 2), (40, 4), (10_000, None)],
                         ids=["tile5-chunk1", "tile5-chunk3", "tile12-chunk2", "tile40-chunk4", "one-tile"])
def test_every_tile_and_chunk_size_gives_the_same_jacobian(model, tile_rows, chunk):
    data, b = make_data([5] * 24)
    b = 0.3 * b
    whole = PartitionKernel(data, model=model, tile_rows=10_000, fast=False).sums(b).gG
    kernel = PartitionKernel(data, model=model, tile_rows=tile_rows, fast=False, chunk=chunk)
    assert kernel.n_tiles == -(-24 // max(1, tile_rows // 5))
    assert len(kernel.chunks) == -(-4 // (chunk or 4))
    np.testing.assert_allclose(kernel.sums(b).gG, whole, rtol=1e-12, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=25), data=st.data())
def test_partial_sums_of_any_split_add_to_the_whole(sizes, data):
    whole_data, b = make_data(sizes, clusters=2)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sizes) - 1), max_size=4)))
    bounds = [0, *cuts, len(sizes)]
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        r0, r1 = whole_data.offsets[lo], whole_data.offsets[hi]
        # clusters never straddle partitions: cut only where the cluster id changes
        part = ChoiceData(whole_data.X[r0:r1], whole_data.dm[r0:r1], whole_data.offsets[lo : hi + 1] - r0,
                          whole_data.chosen[r0:r1], np.arange(lo, hi))
        parts.append(PartitionKernel(part, tile_rows=7).sums(b, covariance=True))
    whole = PartitionKernel(ChoiceData(whole_data.X, whole_data.dm, whole_data.offsets, whole_data.chosen,
                                       np.arange(len(sizes))), tile_rows=7).sums(b, covariance=True)
    total = sum(parts)
    assert total.n_sets == whole.n_sets and total.n_units == whole.n_units
    np.testing.assert_allclose(total.gG, whole.gG, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total.S, whole.S, rtol=1e-12, atol=1e-12)
    assert total.loglik == pytest.approx(whole.loglik, rel=1e-12)


@pytest.mark.parametrize("model", ["logit", "logit-signed"])
@pytest.mark.parametrize("derivatives", ["dual", "adjoint", "fd"])
def test_pullback_gives_the_gradient_2_G_W_g(model, derivatives):
    data, b = make_data(SHAPES["unequal-sets"])
    b = 0.3 * b
    rng = np.random.default_rng(1)
    L = rng.standard_normal((6, 6))
    W = L @ L.T + 6 * np.eye(6)
    kernel = PartitionKernel(data, model=model, derivatives=derivatives, tile_rows=13)
    exact = PartitionKernel(data, model=model, derivatives="dual").sums(b)
    g = kernel.sums(b, jacobian=False).g
    grad = (2.0 / data.n_sets) * kernel.pullback(b, W @ g)
    expected = 2.0 * exact.G.T @ W @ exact.g
    rtol = 1e-5 if derivatives == "fd" else 1e-12
    np.testing.assert_allclose(grad, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reverse_mode_reuses_its_residual_only_at_the_same_params(shape):
    data, b = make_data(SHAPES[shape])
    kernel = PartitionKernel(data, derivatives="adjoint", tile_rows=4)
    exact = PartitionKernel(data, derivatives="dual")
    v = np.arange(6.0)
    for at, then in [(b, b), (b, 0.5 * b), (0.5 * b, b)]:
        kernel.sums(at, jacobian=False)
        kernel.sums(-b, jacobian=True, covariance=True)  # other passes leave the residual alone
        np.testing.assert_allclose(kernel.pullback(then, v), exact.sums(then).gG[:, 1:].T @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fast_path_equals_generic_path(shape):
    data, b = make_data(SHAPES[shape], scale=30.0)
    fast = PartitionKernel(data, tile_rows=9).sums(b, covariance=True)
    generic = PartitionKernel(data, tile_rows=9, fast=False).sums(b, covariance=True)
    np.testing.assert_allclose(fast.gG, generic.gG, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast.hh, generic.hh, rtol=1e-12, atol=1e-12)
    assert fast.loglik == pytest.approx(generic.loglik, rel=1e-12)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_extreme_utilities_give_finite_sums(fast):
    data, b = make_data(SHAPES["unequal-sets"], scale=1e4 / 4)
    out = PartitionKernel(data, fast=fast).sums(b / np.abs(b).max(), covariance=True)
    assert np.all(np.isfinite(out.gG)) and np.all(np.isfinite(out.hh)) and np.isfinite(out.loglik)


def test_logit_moments_api():
    data, b = make_data(SHAPES["equal-sets"])
    g, G = logit_moments(b, data.X, data.dm, data.offsets)
    ref = logit_sums_reference(b, data.X, data.dm, data.offsets, covariance=False)
    np.testing.assert_allclose(g, ref.g, rtol=1e-12)
    np.testing.assert_allclose(G, ref.G, rtol=1e-12, atol=1e-14)
    g2, none = logit_moments(b, data.X, data.dm, data.offsets, jacobian=False)
    assert none is None
    np.testing.assert_allclose(g2, g, rtol=1e-13)


@pytest.mark.parametrize("threads", [1, 2])
def test_buffers_are_reused_and_do_not_grow_with_the_data(threads):
    small, b = make_data([5] * 400)
    large, _ = make_data([5] * 1600)
    ks, kl = (PartitionKernel(d, derivatives="adjoint", tile_rows=50, threads=threads) for d in (small, large))
    for k in (ks, kl):
        k.sums(b, covariance=True)
        k.sums(b, jacobian=False)
        k.pullback(b, np.ones(6))  # at the kept residual
        k.pullback(-b, np.ones(6))  # recomputing s
        k.sums(b)
    before = kl.buffer_nbytes
    kl.sums(b)
    kl.pullback(0.5 * b, np.ones(6))
    assert kl.buffer_nbytes == before == ks.buffer_nbytes
    assert kl.n_tiles == 4 * ks.n_tiles == 160


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
@pytest.mark.parametrize("derivatives", ["dual", "adjoint"])
def test_threads_give_the_same_sums(fast, derivatives):
    data, b = make_data(SHAPES["unequal-sets"] * 5)
    one, two = (PartitionKernel(data, derivatives=derivatives, tile_rows=10, fast=fast, threads=t) for t in (1, 2))
    np.testing.assert_allclose(two.sums(b).gG, one.sums(b).gG, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(two.sums(b, jacobian=False).gG, one.sums(b, jacobian=False).gG, rtol=1e-12, atol=1e-12)
    v = np.linspace(-1, 1, 6)
    np.testing.assert_allclose(two.pullback(b, v), one.pullback(b, v), rtol=1e-12, atol=1e-12)
    assert len({id(ws) for ws in two._workspaces}) == 2 and two._workspaces[1].nbytes > 0


def test_bad_names_are_user_errors():
    data, _ = make_data([3, 3])
    with pytest.raises(UserError, match="allowed: dual, adjoint, fd"):
        PartitionKernel(data, derivatives="backward")
    with pytest.raises(UserError, match="allowed: logit, logit-signed"):
        PartitionKernel(data, model="probit")


def _just_identified_logit(n_sets=400, J=4, K=3, seed=5):
    """Choices drawn from a logit; dm = x - x_chosen, so g(b) = 0 at the conditional logit MLE."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_sets * J, K))
    u = X @ np.array([0.8, -0.5, 0.3])[:K] + rng.gumbel(size=n_sets * J)
    chosen_idx = np.arange(n_sets) * J + u.reshape(n_sets, J).argmax(axis=1)
    dm = X - np.repeat(X[chosen_idx], J, axis=0)
    return ChoiceData(X=X, dm=dm, offsets=np.arange(0, n_sets * J + 1, J, dtype=np.int64))


def test_single_precision_jacobian_keeps_values_and_gives_the_same_estimate():
    data = _just_identified_logit()
    kernel = PartitionKernel(data, tile_rows=64)
    b0 = np.zeros(3)
    double, single = kernel.sums(b0), kernel.sums(b0, precision="single")
    np.testing.assert_array_equal(single.gG[:, 0], double.gG[:, 0])
    np.testing.assert_allclose(single.G, double.G, rtol=0, atol=1e-5 * np.abs(double.G).max())
    assert kernel.single_nbytes == data.dm.nbytes // 2
    estimates = {}
    for precision in ("double", "single"):
        b = b0.copy()
        for _ in range(40):  # Newton on the square system g(b) = 0
            sums = kernel.sums(b, precision=precision)
            b = b - np.linalg.solve(sums.G, sums.g)
        estimates[precision] = b
    assert np.abs(kernel.sums(estimates["double"], jacobian=False).g).max() < 1e-14
    np.testing.assert_allclose(estimates["single"], estimates["double"], rtol=0, atol=1e-10)


IDLE_BLAS_SCRIPT = """
import os, sys, time
import estpipe
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
if not any(i.get("internal_api") == "openblas" for i in threadpool_info()):
    print("no-openblas"); sys.exit()
a = np.random.default_rng(0).uniform(size=(60000, 40))
with threadpool_limits(2, user_api="blas"):
    for _ in range(5):
        a.T @ a
    time.sleep(0.02)  # let a worker that spins use up a short timeout first
    t0 = time.process_time()
    time.sleep(0.3)
print(os.environ["OPENBLAS_THREAD_TIMEOUT"], time.process_time() - t0)
"""


def _idle_blas(env_timeout=None):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if env_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = env_timeout
    out = subprocess.run([sys.executable, "-c", IDLE_BLAS_SCRIPT], env=env, capture_output=True, text=True, check=True).stdout.split()
    if out == ["no-openblas"]:
        pytest.skip("BLAS is not OpenBLAS")
    return out[0], float(out[1])


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs two cores for a BLAS worker")
def test_openblas_workers_sleep_soon_after_a_threaded_call_when_estpipe_is_imported_first():
    # A worker busy-waiting for OpenBLAS's default ~0.1 s takes a core from the kernel's tile
    # threads (estpipe/__init__.py); with estpipe's default it sleeps within a millisecond.
    timeout, idle_cpu = _idle_blas()
    assert timeout == "20"
    assert idle_cpu < 0.03, f"process used {idle_cpu:.3f} s of CPU while idle: a BLAS worker is spinning"


def test_an_explicit_openblas_thread_timeout_is_kept():
    assert _idle_blas("28")[0] == "28"
