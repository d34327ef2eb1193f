"""The Python API: LogitMoments (reusable) and logit_moments (one-shot) against the reference,
their argument checks, no allocation on repeated calls, any import order (real subprocesses), a
forked child, and the README's scipy.optimize example against `estpipe estimate`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import estpipe
from estpipe import LogitMoments, UserError, logit_moments
from estpipe.kernel import logit_sums_reference

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "equal-sets": [5] * 60,
    "unequal-sets": list(np.random.default_rng(3).integers(1, 9, size=70)),
    "singleton-sets": [1, 3, 1, 1, 4, 2, 1] * 5,
}


def make_arrays(sizes, K=4, M=6, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    X = rng.standard_normal((int(offsets[-1]), K))
    dm = rng.standard_normal((int(offsets[-1]), M))
    return X, dm, offsets, 0.5 * rng.standard_normal(K)


@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize("shape", list(SIZES))
def test_reusable_form_equals_the_reference(shape, threads):
    X, dm, offsets, b = make_arrays(SIZES[shape])
    ref = logit_sums_reference(b, X, dm, offsets, covariance=True)
    with LogitMoments(X, dm, offsets, threads=threads, tile_rows=16) as moments:
        for params in (b, -b, np.zeros_like(b)):
            g, G = moments(params)
            r = logit_sums_reference(params, X, dm, offsets, covariance=False)
            np.testing.assert_allclose(g, r.g, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(G, r.G, rtol=1e-12, atol=1e-14)
        g_only, none = moments(b, jacobian=False)
        np.testing.assert_allclose(moments.moment_covariance(b), ref.S, rtol=1e-12, atol=1e-14)
    assert none is None
    np.testing.assert_allclose(g_only, ref.g, rtol=1e-12, atol=1e-14)
    assert (moments.n_sets, moments.n_rows, moments.K, moments.M) == (len(offsets) - 1, len(X), 4, 6)


@pytest.mark.parametrize("jacobian", [True, False], ids=["jacobian", "values"])
def test_one_shot_function_equals_the_reusable_form(jacobian):
    X, dm, offsets, b = make_arrays(SIZES["unequal-sets"])
    with LogitMoments(X, dm, offsets) as moments:
        g, G = moments(b, jacobian=jacobian)
    g1, G1 = logit_moments(b, X, dm, offsets, jacobian=jacobian)
    np.testing.assert_array_equal(g1, g)
    if jacobian:
        np.testing.assert_array_equal(G1, G)
    else:
        assert G is None and G1 is None


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric-W", "any-W"])
def test_objective_and_gradient_are_g_W_g_and_its_derivative(symmetric):
    X, dm, offsets, b = make_arrays(SIZES["equal-sets"])
    A = np.random.default_rng(1).standard_normal((6, 6))
    W = A @ A.T if symmetric else A
    with LogitMoments(X, dm, offsets) as moments:
        Q, grad = moments.objective_and_gradient(b, W)
        g, G = moments(b)
        assert Q == pytest.approx(g @ W @ g, rel=1e-14) == pytest.approx(moments.objective(b, W), rel=1e-14)
        h = 1e-6
        central = [(moments.objective(b + h * e, W) - moments.objective(b - h * e, W)) / (2 * h) for e in np.eye(4)]
        np.testing.assert_allclose(grad, central, rtol=1e-6, atol=1e-9)
        Q_identity, grad_identity = moments.objective_and_gradient(b)
    assert Q_identity == pytest.approx(g @ g, rel=1e-14)
    np.testing.assert_allclose(grad_identity, 2 * G.T @ g, rtol=1e-13)


def _call_peak(moments, b, jacobian) -> int:
    tracemalloc.start()
    moments(b, jacobian=jacobian)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("jacobian", [True, False], ids=["jacobian", "values"])
def test_repeated_calls_allocate_nothing_new(jacobian):
    # What a call may allocate: its results, each thread's (M, 1 + K) sums, and the fixed buffer
    # of numpy's ufunc iterator (np.getbufsize() elements) that each tile thread may hold at once.
    allowance = 2 * (8 * np.getbufsize() + 16_000)
    for sets in (2000, 32000):
        X, dm, offsets, b = make_arrays([5] * sets)
        with LogitMoments(X, dm, offsets, threads=2, tile_rows=8000) as moments:
            moments(b, jacobian=jacobian)
            buffers = moments.buffer_nbytes
            pool = moments._kernel._pool
            peak = max(_call_peak(moments, params, jacobian) for params in (b, -b, 0.5 * b))
            assert moments.buffer_nbytes == buffers and moments._kernel._pool is pool
        assert peak < allowance, (sets, peak, buffers)
    # The same evaluation on fresh buffers (the one-shot function) is well above the allowance.
    tracemalloc.start()
    logit_moments(b, X, dm, offsets, jacobian=jacobian)
    fresh = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert fresh > 2 * allowance, fresh


def _bad(**changes):
    X, dm, offsets, b = make_arrays([3, 2, 4])
    args = {"X": X, "dm": dm, "offsets": offsets, "params": b, **changes}
    return args


def _with(a, index, value):
    a = np.array(a, dtype=np.result_type(a, type(value)))
    a[index] = value
    return a


X0, DM0, OFF0, B0 = make_arrays([3, 2, 4])
BAD_ARGUMENTS = [
    pytest.param(_bad(X=X0[:, 0]), r"X must be a 2-D array \(n_rows, K\), got 1 dimension", id="X-1d"),
    pytest.param(_bad(X=X0.astype(complex)), "X must hold real numbers .*complex128", id="X-complex"),
    pytest.param(_bad(X=X0.astype(object)), "X must hold real numbers .*object", id="X-object"),
    pytest.param(_bad(dm=DM0[:, :0]), "dm has no columns", id="dm-no-columns"),
    pytest.param(_bad(dm=DM0[:-1]), "X has 9 rows but dm has 8", id="dm-rows"),
    pytest.param(_bad(offsets=OFF0.astype(float)), "offsets must be integers .*float64.*astype", id="offsets-float"),
    pytest.param(_bad(offsets=OFF0[:1]), r"offsets must be a 1-D array \(n_sets \+ 1,\) with at least 2", id="offsets-short"),
    pytest.param(_bad(offsets=OFF0 + 1), r"offsets must start at 0 .*offsets\[0\] = 1", id="offsets-start"),
    pytest.param(_bad(offsets=np.array([0, 3, 3, 9])), r"strictly increasing .*offsets\[2\] = 3 is not above offsets\[1\] = 3 \(set 1\)",
                 id="offsets-empty-set"),
    pytest.param(_bad(offsets=np.array([0, 5, 3, 9])), r"offsets\[2\] = 3 is not above offsets\[1\] = 5", id="offsets-decreasing"),
    pytest.param(_bad(offsets=np.array([0, 3, 5, 8])), r"offsets must end at n_rows = 9 .*offsets\[-1\] = 8", id="offsets-end"),
    pytest.param(_bad(X=_with(X0, (4, 2), np.nan)), r"X\[4, 2\] is nan \(set 1\); the moments need finite values", id="X-nan"),
    pytest.param(_bad(dm=_with(DM0, (8, 5), -np.inf)), r"dm\[8, 5\] is -inf \(set 2\)", id="dm-inf"),
    pytest.param(_bad(params=B0[:3]), r"params must have shape \(K,\) = \(4,\).*got shape \(3,\)", id="params-shape"),
    pytest.param(_bad(params=_with(B0, 1, np.nan)), r"params\[1\] is nan", id="params-nan"),
    pytest.param(_bad(params=B0.astype(complex)), "params must be real numbers", id="params-complex"),
]


@pytest.mark.parametrize("form", ["reusable", "one-shot"])
@pytest.mark.parametrize("args, message", BAD_ARGUMENTS)
def test_bad_arguments_are_user_errors_naming_the_argument(form, args, message):
    with pytest.raises(UserError, match=message):
        if form == "reusable":
            with LogitMoments(args["X"], args["dm"], args["offsets"]) as moments:
                moments(args["params"])
        else:
            logit_moments(args["params"], args["X"], args["dm"], args["offsets"])


def test_bad_weight_matrix_and_values_changed_in_place_are_user_errors():
    X, dm, offsets, b = make_arrays([3, 2, 4])
    with LogitMoments(X, dm, offsets) as moments:
        with pytest.raises(UserError, match=r"W must have shape \(M, M\) = \(6, 6\).*got shape \(4, 4\)"):
            moments.objective_and_gradient(b, np.eye(4))
        dm[6, 1] = np.nan  # after the check at construction: found from the NaN moments
        with pytest.raises(UserError, match=r"dm\[6, 1\] is nan \(set 2\)"):
            moments(b, jacobian=False)


def test_a_forked_child_evaluates_with_its_own_threads():
    # The child inherits the pool object but not its threads; it must not wait for them forever.
    X, dm, offsets, b = make_arrays([5] * 400)
    script = f"""
import os, signal, sys, numpy as np
sys.path.insert(0, {str(REPO / 'pipeline')!r})
from estpipe import LogitMoments
rng = np.random.default_rng(0)
X, dm = rng.standard_normal(({len(X)}, 4)), rng.standard_normal(({len(X)}, 6))
moments = LogitMoments(X, dm, np.arange(0, {len(X) + 1}, 5), threads=2, tile_rows=100)
b = np.full(4, 0.3)
parent = [moments(b)[0] for _ in range(3)][-1]  # both tile threads started, both idle
pid = os.fork()
if pid == 0:
    signal.alarm(20)  # a child waiting for threads it does not have ends here, not never
    os._exit(0 if np.array_equal(moments(b)[0], parent) else 1)
print(os.waitpid(pid, 0)[1])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"]


NUMPY_FIRST_SCRIPT = """
import json, os, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits
A = np.random.default_rng(0).uniform(size=(400, 400))
A @ A  # the caller's own threaded BLAS call, before estpipe is imported
import estpipe
from estpipe.kernel import blas, logit_sums_reference
rng = np.random.default_rng(1)
X, dm = rng.standard_normal((6000, 4)), rng.standard_normal((6000, 6))
offsets = np.arange(0, 6001, 6)
b = np.array([0.3, -0.2, 0.1, 0.4])
with estpipe.LogitMoments(X, dm, offsets, threads=2, tile_rows=1000) as moments:
    g, G = moments(b)
ref = logit_sums_reference(b, X, dm, offsets, covariance=False)
error = max(float(np.abs(g - ref.g).max()), float(np.abs(G - ref.G).max()))
openblas = [i for i in threadpool_info() if i.get("internal_api") == "openblas" and i.get("threading_layer") == "pthreads"]
idle_cpu = None
if openblas:
    with threadpool_limits(2, user_api="blas"):
        for _ in range(5):
            A @ A
        time.sleep(0.02)  # a worker that honours the short timeout is asleep by now
        t0 = time.process_time()
        time.sleep(0.3)
        idle_cpu = time.process_time() - t0
print(json.dumps({"error": error, "openblas": len(openblas), "restarted": len(blas.restarted), "idle_cpu": idle_cpu}))
"""


def _run_script(script, estpipe_first=False, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS",
                                                            "OMP_NUM_THREADS", "ESTPIPE_OPENBLAS_RESTART")}
    env.update(env_changes)
    if estpipe_first:
        script = "import estpipe\n" + script
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores for a BLAS worker")
def test_a_script_that_imports_numpy_first_gets_sleeping_blas_workers():
    # Before kernel/blas.py, OpenBLAS kept its default ~0.1 s busy wait here (estpipe's setting
    # came too late) and its worker took a core from the tile threads.
    out = _run_script(NUMPY_FIRST_SCRIPT)
    assert out["error"] < 1e-12
    if not out["openblas"]:
        pytest.skip("BLAS is not OpenBLAS with pthreads")
    assert out["restarted"] == out["openblas"]
    assert out["idle_cpu"] < 0.03, f"process used {out['idle_cpu']:.3f} s of CPU while idle: a BLAS worker is spinning"


@pytest.mark.parametrize("case", ["estpipe-first", "restart-off"])
def test_nothing_is_restarted_when_estpipe_came_first_or_when_turned_off(case):
    out = _run_script(NUMPY_FIRST_SCRIPT, estpipe_first=case == "estpipe-first",
                      **({"ESTPIPE_OPENBLAS_RESTART": "0"} if case == "restart-off" else {}))
    assert out["error"] < 1e-12 and out["restarted"] == 0


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_gives_the_estimate_of_estpipe_estimate(tmp_path):
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120}
    simulate = [sys.executable, "-m", "estpipe", "simulate", "data.h5", "--sets", "1500", "--alternatives", "4",
                "--params", "3", "--moments", "6", "--seed", "2"]
    assert subprocess.run(simulate, **run).returncode == 0
    estimate = subprocess.run([sys.executable, "-m", "estpipe", "estimate", "data.h5", "--json"], **run)
    assert estimate.returncode == 0, estimate.stderr
    expected = json.loads(estimate.stdout)
    script = _readme_example() + "\nimport json\nprint(json.dumps({'step1': step1.x.tolist(), 'step2': step2.x.tolist(), " \
                                 "'ok': bool(step1.success and step2.success)}))\n"
    example = subprocess.run([sys.executable, "-c", script], **run)
    assert example.returncode == 0, example.stderr
    got = json.loads(example.stdout.splitlines()[-1])
    assert got["ok"]
    se = np.asarray(expected["std_errors"])
    np.testing.assert_allclose(got["step1"], expected["steps"][0]["params"], rtol=0, atol=1e-5 * se.min())
    np.testing.assert_allclose(got["step2"], expected["params"], rtol=0, atol=1e-5 * se.min())


def test_the_package_exports_the_api():
    assert estpipe.LogitMoments is LogitMoments and "LogitMoments" in estpipe.__all__
