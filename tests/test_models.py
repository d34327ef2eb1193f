"""Models by name, and their Jacobians against central differences and complex step (hypothesis)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from estpipe.data.format import ChoiceData
from estpipe.errors import UserError
from estpipe.kernel import PartitionKernel
from estpipe.models import MODELS, get_model

MODEL_NAMES = ["logit", "logit-signed"]


@st.composite
def problems(draw, max_scale):
    """Random K, M, set sizes (variable), data and parameters; utilities up to about max_scale."""
    K = draw(st.integers(1, 4))
    M = draw(st.integers(K, 6))
    sizes = draw(st.lists(st.integers(1, 7), min_size=1, max_size=12))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([s for s in (0.1, 1.0, 10.0, 1e2, 1e4) if s <= max_scale]))
    rng = np.random.default_rng(seed)
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    X = rng.standard_normal((offsets[-1], K))
    dm = rng.standard_normal((offsets[-1], M))
    theta = rng.uniform(-1, 1, size=K)
    return ChoiceData(X=X, dm=dm, offsets=offsets), theta, scale


def _params(model, theta, scale):
    """Parameters giving utilities of about `scale` in size for either model."""
    if model == "logit":
        return scale * theta
    return np.log(scale) + 0.5 * theta  # b = -exp(.) has size about scale


def _values(kernel, params):
    return kernel.sums(params, jacobian=False).gG[:, 0]


@pytest.mark.parametrize("model", MODEL_NAMES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_scale=10.0))
def test_jacobian_matches_central_differences(model, problem):
    data, theta, scale = problem
    params = _params(model, theta, scale)
    kernel = PartitionKernel(data, model=model, tile_rows=8)
    G = kernel.sums(params).gG[:, 1:]
    central = np.empty_like(G)
    for k in range(len(params)):
        h = 1e-6 * max(1.0, abs(params[k]))
        e = np.zeros(len(params))
        e[k] = h
        central[:, k] = (_values(kernel, params + e) - _values(kernel, params - e)) / (2 * h)
    scale_G = max(1.0, np.abs(G).max())
    np.testing.assert_allclose(G, central, rtol=0, atol=1e-6 * scale_G)


@pytest.mark.parametrize("model", MODEL_NAMES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_scale=1e4))
def test_jacobian_matches_complex_step(model, problem):
    data, theta, scale = problem
    params = _params(model, theta, scale)
    kernel = PartitionKernel(data, model=model, tile_rows=8)
    G = kernel.sums(params).gG[:, 1:]
    h = 1e-30
    step = np.empty_like(G)
    for k in range(len(params)):
        z = params.astype(complex)
        z[k] += 1j * h
        step[:, k] = kernel.sums(z, jacobian=False).gG[:, 0].imag / h
    assert np.all(np.isfinite(G))
    # Utilities of size `scale` carry rounding of scale * eps; where the probabilities saturate,
    # both derivatives turn it into absolute errors of that size in G (found by hypothesis at 1e4).
    np.testing.assert_allclose(G, step, rtol=1e-12, atol=1e-12 * max(1.0, scale) * max(1.0, np.abs(G).max()))


def test_signed_model_costs_no_derivative_code():
    """logit-signed at theta equals logit at b = -exp(theta), with the chain rule applied."""
    rng = np.random.default_rng(0)
    offsets = np.arange(0, 61, 6)
    data = ChoiceData(X=rng.standard_normal((60, 3)), dm=rng.standard_normal((60, 5)), offsets=offsets)
    theta = rng.uniform(-1, 1, size=3)
    b = -np.exp(theta)
    signed = PartitionKernel(data, model="logit-signed").sums(theta)
    plain = PartitionKernel(data, model="logit").sums(b)
    np.testing.assert_allclose(signed.gG[:, 0], plain.gG[:, 0], rtol=1e-13)
    np.testing.assert_allclose(signed.gG[:, 1:], plain.gG[:, 1:] * b, rtol=1e-12)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registry_entries(name):
    model = get_model(name)
    assert model is MODELS[name] and model.name == name
    assert model.n_params(3) == 3
    names = model.param_names(["price", "time", "size"])
    assert len(names) == 3 and len(set(names)) == 3
    assert model.start(3).shape == (3,) and np.all(np.isfinite(model.start(3)))


def test_unknown_model_lists_the_allowed_names():
    with pytest.raises(UserError, match=r"unknown model 'probit'; allowed: logit, logit-signed"):
        get_model("probit")


def test_draws_use_scipys_qmc_engines_without_importing_scipy_stats():
    """models/draws.py loads scipy.stats._qmc without scipy.stats' package __init__ (0.7 s of
    distributions and docstrings): in a fresh process the engines are scipy's own, scipy.stats
    is not imported by it, and a later `import scipy.stats` works and shares the same engines,
    whose points are those scipy.stats.qmc gives."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from estpipe.models import draws
        with draws._qmc() as q:
            points = {k: getattr(q, k)(d=3, scramble=True, seed=4).random(64) for k in ("Halton", "Sobol")}
        cells = {k: draws._base_cells(k, 64, 3, 4) for k in ("halton", "sobol")}
        assert "scipy.stats" not in sys.modules, "scipy.stats was imported"
        import scipy.stats
        from scipy.stats import qmc
        assert scipy.stats.norm.cdf(0.0) == 0.5
        for k, p in points.items():
            assert getattr(qmc, k) is getattr(q, k)
            assert np.array_equal(getattr(qmc, k)(d=3, scramble=True, seed=4).random(64), p)
        draws._base_cells.cache_clear()
        for k, c in cells.items():  # made again with scipy.stats imported: the same
            assert np.array_equal(draws._base_cells(k, 64, 3, 4), c)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_draws_fall_back_to_the_plain_scipy_stats_import():
    """Where scipy.stats._qmc cannot be loaded on its own (simulated: an import hook refuses it
    once), the draws come from the plain `from scipy.stats import qmc`, the same points."""
    code = textwrap.dedent("""
        import sys
        import numpy as np

        class RefuseOnce:
            refused = False
            def find_spec(self, name, path=None, target=None):
                if name == "scipy.stats._qmc" and not RefuseOnce.refused:
                    RefuseOnce.refused = True
                    raise ImportError("refused once")
                return None

        sys.meta_path.insert(0, RefuseOnce())
        from estpipe.models import draws
        cells = draws._base_cells("sobol", 32, 2, 5)
        assert RefuseOnce.refused and "scipy.stats" in sys.modules
        from scipy.stats import qmc
        ref = qmc.Sobol(d=2, scramble=True, seed=5).random(32)
        assert np.array_equal(cells, np.minimum((ref * draws.CELLS).astype(np.uint32), np.uint32(draws.CELLS - 1)))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
