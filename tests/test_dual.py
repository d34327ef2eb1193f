"""The dual-block primitives: each tangent rule against finite differences and complex step."""

from __future__ import annotations

import numpy as np
import pytest

from estpipe import dual
from estpipe.dual import Segments, Workspace, chunk_ranges, chunk_size

P = 3
RNG = np.random.default_rng(7)
A = RNG.standard_normal((12, P))  # x(theta) = A @ theta gives a dual with P partials
THETA = np.array([0.3, -0.2, 0.5])
C_ROWS = RNG.uniform(0.5, 1.5, size=12)
M_PROJ = RNG.standard_normal((12, 4))
SEGMENTS = {"equal-sets": [0, 4, 8, 12], "unequal-sets": [0, 1, 6, 8, 12]}


def _positive(x):
    return dual.exp(x * 0.5)


# name -> op(x, seg), each a function of the dual x = A @ theta
OPS = {
    "add-dual": lambda x, seg: x + x * 2.0,
    "add-array": lambda x, seg: x + C_ROWS,
    "add-scalar": lambda x, seg: 3.0 + x,
    "subtract-dual": lambda x, seg: x - dual.exp(x),
    "subtract-array": lambda x, seg: x - C_ROWS,
    "negative": lambda x, seg: -x,
    "multiply-dual": lambda x, seg: x * dual.exp(x),
    "multiply-array": lambda x, seg: x * C_ROWS,
    "divide-dual": lambda x, seg: x / _positive(x),
    "divide-array": lambda x, seg: x / C_ROWS,
    "rdivide": lambda x, seg: 2.0 / _positive(x),
    "reciprocal": lambda x, seg: dual.reciprocal(_positive(x)),
    "exp": lambda x, seg: dual.exp(x),
    "log": lambda x, seg: dual.log(_positive(x)),
    "power-scalar": lambda x, seg: dual.power(_positive(x), 1.7),
    "power-array": lambda x, seg: _positive(x) ** C_ROWS,
    "segment-sum": lambda x, seg: dual.segment_sum(x, seg),
    "segment-max": lambda x, seg: dual.segment_max(x, seg),
    "segment-logsumexp": lambda x, seg: dual.segment_logsumexp(x, seg),
    "segment-softmax": lambda x, seg: dual.segment_softmax(x, seg),
    "broadcast": lambda x, seg: dual.broadcast(dual.segment_sum(x, seg), seg),
    # a one-row block (a parameter) broadcasts over the other operand's rows
    "multiply-row-dual": lambda x, seg: x[0:1] * x,
    "multiply-row-array": lambda x, seg: x[2:3] * C_ROWS,
    "add-row-dual": lambda x, seg: x[1:2] + x,
    "subtract-row-dual": lambda x, seg: x[1:2] - dual.exp(x),
    "project-softmax": lambda x, seg: dual.project_softmax(M_PROJ, x, seg)[0],
}


def _evaluate(op, theta, seg, partials=True):
    ws = Workspace()
    t = dual.seed(theta, ws, 0, P if partials else 0)
    out = op(dual.linear(A, t), seg)
    return out if isinstance(out, np.ndarray) else out.a.copy()


@pytest.mark.parametrize("seg_name", list(SEGMENTS))
@pytest.mark.parametrize("name", list(OPS))
def test_tangent_rule_matches_finite_differences(name, seg_name):
    seg = Segments(np.array(SEGMENTS[seg_name]))
    out = _evaluate(OPS[name], THETA, seg)
    h = 1e-6
    for k in range(P):
        e = np.zeros(P)
        e[k] = h
        central = (_evaluate(OPS[name], THETA + e, seg, False)[:, 0] - _evaluate(OPS[name], THETA - e, seg, False)[:, 0]) / (2 * h)
        np.testing.assert_allclose(out[:, 1 + k], central, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seg_name", list(SEGMENTS))
@pytest.mark.parametrize("name", list(OPS))
def test_tangent_rule_matches_complex_step(name, seg_name):
    seg = Segments(np.array(SEGMENTS[seg_name]))
    out = _evaluate(OPS[name], THETA, seg)
    h = 1e-30
    for k in range(P):
        theta = THETA.astype(complex)
        theta[k] += 1j * h
        step = _evaluate(OPS[name], theta, seg, False)[:, 0].imag / h
        np.testing.assert_allclose(out[:, 1 + k], step, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seg_name", list(SEGMENTS))
@pytest.mark.parametrize("dtype", [float, complex], ids=["real", "complex"])
@pytest.mark.parametrize("scale", [0.3, 1e3], ids=["utilities-small", "utilities-1e3"])
def test_project_softmax_equals_the_projected_softmax(seg_name, dtype, scale):
    seg = Segments(np.array(SEGMENTS[seg_name]))
    ws = Workspace()
    u = dual.exp(dual.linear(A, dual.seed(THETA.astype(dtype), ws))) * scale
    got, H = dual.project_softmax(M_PROJ, u, seg)
    s = dual.segment_softmax(u, seg)
    want = dual.project(M_PROJ, s)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())
    np.testing.assert_allclose(H, np.add.reduceat(s.value[:, None] * M_PROJ, seg.starts), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("k0", "k1"), [(0, 3), (1, 3), (0, 1), (0, 0)], ids=["all", "chunk-1-3", "chunk-0-1", "values"])
@pytest.mark.parametrize("rows", [slice(None), slice(1, 3), slice(0, 1), slice(2, None)], ids=["theta", "1:3", "0:1", "2:"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unit-seed", "scaled-seed"])
def test_linear_of_a_seed_equals_the_product(k0, k1, rows, scaled):
    """linear copies the columns a seed (or rows of one) selects instead of a GEMM; the same as
    the product with the seed's dense block."""
    ws = Workspace()
    scale = np.array([0.5, 2.0, 4.0]) if scaled else None
    for theta in (dual.seed(THETA, ws, k0, k1, scale)[rows], dual.seed(THETA + 0.1j, ws, k0, k1, scale)[rows]):
        X = A[:, : theta.rows]
        assert theta.seeded is not None
        dense = dual.Dual(theta.a.copy(), ws)
        np.testing.assert_allclose(dual.linear(X, theta).a, dual.linear(X, dense).a, rtol=1e-14, atol=1e-15)


def test_project_is_one_product_of_values_and_partials():
    ws = Workspace()
    x = dual.linear(A, dual.seed(THETA, ws))
    block = dual.project(M_PROJ, x)
    np.testing.assert_allclose(block[:, 0], M_PROJ.T @ (A @ THETA))
    np.testing.assert_allclose(block[:, 1:], M_PROJ.T @ A)


@pytest.mark.parametrize("seg_name", list(SEGMENTS))
@pytest.mark.parametrize("scale", [1e2, 1e4], ids=["utilities-1e2", "utilities-1e4"])
def test_segment_softmax_and_logsumexp_are_stable(seg_name, scale):
    seg = Segments(np.array(SEGMENTS[seg_name]))
    ws = Workspace()
    u = dual.linear(A * scale, dual.seed(np.array([1.0, -1.0, 0.5]), ws))
    s = dual.segment_softmax(u, seg)
    lse = dual.segment_logsumexp(u, seg)
    assert np.all(np.isfinite(s.a)) and np.all(np.isfinite(lse.a))
    sums = np.add.reduceat(s.value, seg.starts)
    np.testing.assert_allclose(sums, 1.0)
    top = np.maximum.reduceat(u.value, seg.starts)
    np.testing.assert_allclose(lse.value, top, rtol=1e-12)  # one term dominates at this scale
    assert np.all(lse.value >= top)


def test_workspace_reuses_buffers_and_is_not_shared():
    seg = Segments(np.array(SEGMENTS["unequal-sets"]))
    ws = Workspace()

    def run():
        ws.reset()
        return dual.segment_softmax(dual.linear(A, dual.seed(THETA, ws)), seg).a

    first = run()
    size = ws.nbytes
    second = run()
    assert ws.nbytes == size and np.shares_memory(first, second)
    other = Workspace()
    third = dual.segment_softmax(dual.linear(A, dual.seed(THETA, other)), seg).a
    assert not np.shares_memory(first, third)


@pytest.mark.parametrize(
    "n_params, expected",
    [(1, 1), (20, 20), (64, 64), (65, 33), (100, 50), (130, 44)],
    ids=["P1", "P20", "P64", "P65", "P100", "P130"],
)
def test_chunk_rule(n_params, expected):
    size = chunk_size(n_params)
    assert size == expected
    ranges = chunk_ranges(n_params, size)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_params
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# -- groups of rows inside sets (dual/groups.py): a nest within one set ------------------------------
# keys per row for the 12 rows of A; "in-order" has each set's groups as runs of rows, "scattered"
# interleaves them (a set's alternatives listed across nests), with single-row groups in both
GROUP_KEYS = {"in-order": [0, 0, 1, 1, 2, 2, 2, 2, 1, 1, 5, 5], "scattered": [1, 0, 1, 0, 2, 0, 2, 1, 0, 3, 0, 3]}

GROUP_OPS = {
    "group-sum": lambda x, g: dual.group_sum(x, g),
    "group-broadcast": lambda x, g: dual.group_broadcast(dual.group_sum(x * x, g), g),
    "group-logsumexp": lambda x, g: dual.group_logsumexp(x, g),
    "group-softmax": lambda x, g: dual.group_softmax(x, g),
    # the nested logit's two levels: inclusive values scaled, then a softmax over each set's groups
    "group-logsumexp-by-set": lambda x, g: dual.segment_softmax(dual.group_logsumexp(x, g) * 0.7, g.sets),
}


def _groups(seg_name, key_name):
    return dual.Groups(Segments(np.array(SEGMENTS[seg_name])), np.array(GROUP_KEYS[key_name]))


@pytest.mark.parametrize("key_name", list(GROUP_KEYS))
@pytest.mark.parametrize("seg_name", list(SEGMENTS))
@pytest.mark.parametrize("name", list(GROUP_OPS))
def test_group_tangent_rules_match_complex_step_and_finite_differences(name, seg_name, key_name):
    groups = _groups(seg_name, key_name)
    out = _evaluate(GROUP_OPS[name], THETA, groups)
    for k in range(P):
        theta = THETA.astype(complex)
        theta[k] += 1j * 1e-30
        step = _evaluate(GROUP_OPS[name], theta, groups, False)[:, 0].imag / 1e-30
        np.testing.assert_allclose(out[:, 1 + k], step, rtol=1e-12, atol=1e-14)
        e = np.zeros(P)
        e[k] = 1e-6
        central = (_evaluate(GROUP_OPS[name], THETA + e, groups, False)[:, 0]
                   - _evaluate(GROUP_OPS[name], THETA - e, groups, False)[:, 0]) / 2e-6
        np.testing.assert_allclose(out[:, 1 + k], central, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("key_name", list(GROUP_KEYS))
@pytest.mark.parametrize("seg_name", list(SEGMENTS))
def test_groups_are_the_rows_of_a_set_with_one_key(seg_name, key_name):
    """Against a loop over sets and keys: the groups, their sums, log-sum-exp and softmax, stable
    at utilities of 1e4."""
    groups = _groups(seg_name, key_name)
    offsets, key = np.array(SEGMENTS[seg_name]), np.array(GROUP_KEYS[key_name])
    x = A @ THETA * 1e4
    expected_lse, expected_soft, expected_set = [], np.empty(12), []
    for i in range(len(offsets) - 1):
        rows = np.arange(offsets[i], offsets[i + 1])
        for k in np.unique(key[rows]):
            r = rows[key[rows] == k]
            top = x[r].max()
            expected_lse.append(top + np.log(np.exp(x[r] - top).sum()))
            expected_soft[r] = np.exp(x[r] - top) / np.exp(x[r] - top).sum()
            expected_set.append(i)
            assert np.all(groups.row_group[r] == len(expected_lse) - 1)
    assert groups.n_groups == len(expected_lse)
    np.testing.assert_array_equal(groups.group_set, expected_set)
    np.testing.assert_array_equal(np.repeat(np.arange(len(offsets) - 1), np.diff(groups.sets.offsets)), expected_set)
    ws = Workspace()
    u = dual.linear(A * 1e4, dual.seed(THETA, ws))
    np.testing.assert_allclose(dual.group_logsumexp(u, groups).value, expected_lse, rtol=1e-13)
    np.testing.assert_allclose(dual.group_softmax(u, groups).value, expected_soft, rtol=1e-12, atol=1e-300)
    sums = dual.group_sum(u, groups).a
    np.testing.assert_allclose(sums, np.array([[u.a[groups.row_group == g].sum(axis=0)] for g in range(groups.n_groups)])[:, 0])
    assert (groups.order is None) == (key_name == "in-order")
