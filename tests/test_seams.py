"""The seams between layers: who may import whom, the kernel's strategy chosen once, the
covariance pass on several threads equal to the serial sums, the adjoint through the forward
projection said in the log and the results, and registries that refuse what they do not hold."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estpipe.data.format import ChoiceData
from estpipe.errors import UserError
from estpipe.estimation.optimizers import OPTIMIZERS
from estpipe.kernel import DERIVATIVES, PartitionKernel
from estpipe.kernel.fused_logit import FusedLogit
from estpipe.kernel.generic import GenericDual
from estpipe.kernel.reference import logit_sums_reference
from estpipe.kernel.request import Request
from estpipe.models import MODELS

PACKAGE = Path(__file__).parents[1] / "pipeline" / "estpipe"


def _imports(folder: str) -> set[str]:
    found = set()
    for path in (PACKAGE / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize(("layer", "forbidden"), [
    pytest.param("estimation", ("estpipe.execution", "estpipe.cli", "estpipe.orchestration", "estpipe.jobs"), id="estimation"),
    pytest.param("kernel", ("estpipe.execution", "estpipe.cli", "estpipe.orchestration", "estpipe.estimation"), id="kernel"),
    pytest.param("dual", ("estpipe.kernel", "estpipe.models", "estpipe.execution", "estpipe.cli"), id="dual"),
    pytest.param("models", ("estpipe.kernel", "estpipe.execution", "estpipe.cli", "estpipe.estimation"), id="models"),
    pytest.param("orchestration", ("estpipe.cli",), id="orchestration"),
])
def test_layers_import_only_what_is_below_them(layer, forbidden):
    bad = sorted(m for m in _imports(layer) if m.startswith(forbidden))
    assert bad == [], f"{layer} imports {bad}"


def _clustered_data(seed=0, n_sets=60, J=3, K=2, M=4):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, n_sets)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = int(offsets[-1])
    X = rng.standard_normal((rows, K))
    dm = rng.standard_normal((rows, M))
    chosen = np.zeros(rows, dtype=np.int8)
    chosen[offsets[:-1] + rng.integers(0, sizes)] = 1
    cluster = np.repeat(np.arange(n_sets), rng.integers(1, 9, n_sets))[:n_sets]
    return ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen, cluster=cluster)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), tile_rows=st.integers(2, 40), fast=st.booleans())
def test_covariance_on_two_threads_equals_one_and_the_reference(seed, tile_rows, fast):
    """Clusters spanning tiles, tiles dealt round robin to two threads: the units' open ends are
    joined in tile order, so the sums are those of one thread and of the plain reference."""
    data = _clustered_data(seed)
    b = np.array([0.4, -0.7])
    one = PartitionKernel(data, tile_rows=tile_rows, fast=fast, threads=1).sums(b, covariance=True)
    two_kernel = PartitionKernel(data, tile_rows=tile_rows, fast=fast, threads=2)
    two = two_kernel.sums(b, covariance=True)
    ref = logit_sums_reference(b, data.X, data.dm, data.offsets, chosen=data.chosen, cluster=data.cluster)
    assert two_kernel.n_tiles > 2
    for s in (one, two):
        np.testing.assert_allclose(s.hh, ref.hh, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(s.nh, ref.nh, rtol=1e-11, atol=1e-12)
        assert (s.nn, s.n_units) == (ref.nn, ref.n_units)
        assert s.loglik == pytest.approx(ref.loglik, rel=1e-12)
        np.testing.assert_allclose(s.gG, ref.gG, rtol=1e-11, atol=1e-12)


def test_the_strategy_is_chosen_once_from_the_model():
    data = _clustered_data()
    assert isinstance(PartitionKernel(data, model="logit").strategy, FusedLogit)
    assert isinstance(PartitionKernel(data, model="logit-signed").strategy, GenericDual)
    assert isinstance(PartitionKernel(data, model="logit", fast=False).strategy, GenericDual)
    assert PartitionKernel(data, model="logit", derivatives="adjoint").gradient_rule.startswith("reverse rule")
    assert PartitionKernel(data, model="logit-signed", derivatives="adjoint").gradient_rule.startswith("forward projection")


def test_adjoint_without_a_reverse_rule_says_so(tmp_path):
    from estpipe.data.format import write_choice_data
    from estpipe.orchestration import EstimateOptions, Reporter, estimate

    rng = np.random.default_rng(3)
    n, J = 400, 4
    offsets = np.arange(0, n * J + 1, J)
    X = np.abs(rng.standard_normal((n * J, 2))) + 0.2
    u = X @ np.array([-1.0, -0.5])
    e = np.exp(u).reshape(n, J)
    pick = (np.cumsum(e / e.sum(1, keepdims=True), 1) > rng.uniform(size=(n, 1))).argmax(1)
    chosen = np.zeros(n * J, dtype=np.int8)
    chosen[offsets[:-1] + pick] = 1
    dm = X - np.repeat(X[chosen == 1], J, axis=0)
    path = tmp_path / "signed.h5"
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen), ["cost", "time"], ["z1", "z2"])

    class Lines(Reporter):
        def __init__(self):
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    lines = Lines()
    r = estimate(path, EstimateOptions(model="logit-signed", optimizer="bfgs", derivatives="adjoint"), reporter=lines)
    assert r.converged
    assert r.telemetry.gradient_rule.startswith("forward projection: model logit-signed has no reverse rule")
    assert r.to_dict()["gradient_rule"] == r.telemetry.gradient_rule
    assert any("derivatives adjoint: forward projection" in line for line in lines.lines)
    dual = estimate(path, EstimateOptions(model="logit-signed", optimizer="bfgs"))
    np.testing.assert_allclose(r.params, dual.params, rtol=1e-6)


@pytest.mark.parametrize(("registry", "name", "expected"), [
    pytest.param(OPTIMIZERS, "newton", "unknown optimizer 'newton'; allowed: gauss-newton, bfgs, l-bfgs-b", id="optimizer"),
    pytest.param(DERIVATIVES, "dula", "(did you mean 'dual'?)", id="derivatives"),
    pytest.param(MODELS, "probit", "unknown model 'probit'; allowed: logit, logit-signed", id="model"),
])
def test_registries_refuse_names_they_do_not_hold(registry, name, expected):
    with pytest.raises(UserError) as err:
        registry.get(name)
    assert expected in str(err.value)


def test_a_request_names_only_known_quantities():
    with pytest.raises(ValueError, match="unknown quantities"):
        Request(params=np.zeros(2), needs=frozenset({"hessians"}))
    r = Request.of(np.zeros(2), jacobian=False, covariance=True)
    assert (r.jacobian, r.covariance) == (False, True) and "moments" in r.needs
