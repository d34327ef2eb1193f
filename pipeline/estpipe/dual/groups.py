"""Groups of rows inside the sets of a tile (a nest within one set), and dual operations over them.

A group is the rows of one set that share a key (the nest of their alternative). Groups are
numbered set by set, in the order of their keys, so the groups of set i are a contiguous run of
group indices and `Groups.sets` (a Segments over groups) gives the per-set reductions of per-group
quantities (the upper level of a nested logit). The rows of a group need not be adjacent in the
set. Sums over groups are one product with the sparse 0/1 matrix of groups by rows (scipy CSR:
~6x faster than `np.add.reduceat` over the rows of a (rows, C) block, and no copy in group
order when the rows of a group are not adjacent); maxima run on the rows in group order.

Each operation states its tangent rule beside it (dual/block.py); the sums and broadcasts are
linear, so their tangents are the same operation on the partials.
"""

from __future__ import annotations

import numpy as np

from estpipe.dual.block import Dual
from estpipe.dual.segments import Segments


class Groups:
    """The groups of one tile's rows. seg: the tile's sets; key: (rows,) integer key per row (rows
    of one set with the same key form a group).

    row_group: (rows,) each row's group; n_groups; group_set: (n_groups,) each group's set;
    sets: Segments of the groups by set; order: (rows,) the rows in group order, or None when the
    rows already are (then `runs` are offsets into the rows themselves); runs: Segments over the
    rows in group order (one segment per group)."""

    def __init__(self, seg: Segments, key: np.ndarray):
        key = np.asarray(key, dtype=np.int64)
        if key.shape != (seg.n_rows,):
            raise ValueError(f"key must have shape ({seg.n_rows},), got {key.shape}")
        set_of_row = np.repeat(np.arange(seg.n_sets, dtype=np.int64), seg.sizes)
        span = int(key.max()) - int(key.min()) + 1 if len(key) else 1
        combined = set_of_row * span + (key - (int(key.min()) if len(key) else 0))
        unique, row_group = np.unique(combined, return_inverse=True)
        self.seg = seg
        self.row_group = row_group.astype(np.int64).reshape(-1)
        self.n_rows = seg.n_rows
        self.n_groups = len(unique)
        self.group_set = unique // span
        self.sets = Segments(np.searchsorted(self.group_set, np.arange(seg.n_sets + 1), side="left"))
        in_order = bool(np.all(np.diff(self.row_group) >= 0))
        self.order = None if in_order else np.argsort(self.row_group, kind="stable")
        sizes = np.bincount(self.row_group, minlength=self.n_groups)
        self.sizes = sizes
        self.runs = Segments(np.r_[0, np.cumsum(sizes)])
        # the (n_groups, rows) 0/1 matrix of groups by rows and the (n_sets, n_groups) one of sets by
        # groups, as CSR arrays (indptr, indices)
        self._rows_in_order = np.arange(self.n_rows, dtype=np.int64) if self.order is None else self.order.astype(np.int64)
        self._row_ones = np.ones(self.n_rows)
        self._group_indices = np.arange(self.n_groups, dtype=np.int64)
        self._group_ones = np.ones(self.n_groups)

    def _ordered(self, A: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
        """A's rows in group order (A itself when they already are)."""
        if self.order is None:
            return A
        if scratch is None:
            return A[self.order]
        return np.take(A, self.order, axis=0, out=scratch)

    # -- reductions over the rows of each group ------------------------------------------------
    def sum(self, A: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Per-group sums of A (rows, C) or (rows,) (into out (n_groups, ...) when given)."""
        return _csr_product(self.runs.offsets, self._rows_in_order, self._row_ones, A, self.n_groups, out)

    def weighted_sum(self, w: np.ndarray, A: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Per-group sums of w_r A_r (n_groups, C) for w (rows,) and A (rows, C): one product with
        the indicator weighted by w, no (rows, C) temporary."""
        data = w if self.order is None else w[self.order]
        return _csr_product(self.runs.offsets, self._rows_in_order, data, A, self.n_groups, out)

    def set_sum(self, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Per-set sums of per-group values v (n_groups, ...) -> (n_sets, ...)."""
        return _csr_product(self.sets.offsets, self._group_indices, self._group_ones, v, self.seg.n_sets, out)

    def sum1(self, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Per-group sums of a vector (rows,) (into out (n_groups,) when given)."""
        return self.sum(a, out)

    def max1(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Per-group maxima of a real vector (rows,) into out (n_groups,)."""
        return self.runs.max1(self._ordered(a), out)

    def broadcast(self, v: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows' copies of per-group values v (n_groups, ...) into out (rows, ...)."""
        if out.dtype != v.dtype:
            out[...] = v[self.row_group]
            return out
        return np.take(v, self.row_group, axis=0, out=out)


def _csr_product(indptr, indices, data, A: np.ndarray, n_out: int, out: np.ndarray | None) -> np.ndarray:
    """The CSR matrix (indptr, indices, data) (n_out, len(A)) times A (n, C) or (n,), into out when
    given. Real float64 operands go straight to scipy's CSR kernel, accumulating into out (no
    fresh result array: large fresh arrays cost page faults on every evaluation); others (complex
    steps) through scipy.sparse."""
    shape = (n_out,) + A.shape[1:]
    if out is None:
        out = np.empty(shape, dtype=np.result_type(data.dtype, A.dtype))
    kernel = _csr_matvecs()
    if kernel is not None and A.dtype == np.float64 and data.dtype == np.float64 and out.dtype == np.float64 \
            and out.flags.c_contiguous:
        A = np.ascontiguousarray(A)
        out[...] = 0.0
        columns = 1 if A.ndim == 1 else A.shape[1]
        kernel(n_out, A.shape[0], columns, indptr, indices, data, A.reshape(-1), out.reshape(-1))
        return out
    from scipy import sparse

    out[...] = sparse.csr_matrix((data, indices, indptr), shape=(n_out, A.shape[0])) @ A
    return out


_CSR_MATVECS = []  # [kernel or None] once looked up


def _csr_matvecs():
    """scipy's CSR times dense kernel (y += A x for several x), private but stable since scipy 0.x;
    None without it. Imported when first used (scipy.sparse costs 0.2 s of a process's start, which
    a run refused for bad input, or one without nests, does not need)."""
    if not _CSR_MATVECS:
        try:
            from scipy.sparse._sparsetools import csr_matvecs
        except ImportError:  # pragma: no cover
            csr_matvecs = None
        _CSR_MATVECS.append(csr_matvecs)
    return _CSR_MATVECS[0]


# -- dual operations over groups ---------------------------------------------------------------
def group_sum(x: Dual, groups: Groups) -> Dual:
    """Per-group sums (n_groups, 1 + p).  Tangent: the per-group sums of dx (it is linear)."""
    out = x._new(rows=groups.n_groups)
    groups.sum(x.a, out.a)
    return out


def group_broadcast(x: Dual, groups: Groups) -> Dual:
    """A per-group dual (n_groups, 1 + p) repeated on the rows of each group (rows, 1 + p).
    Tangent: the same repeat."""
    out = x._new(rows=groups.n_rows)
    groups.broadcast(x.a, out.a)
    return out


def _shifted_exp(x: Dual, groups: Groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exp(x - m_group), its per-group sums, and m, the per-group maximum of the real values (a
    constant shift: it cancels from the softmax and the log-sum-exp and their tangents, and keeps
    exp in [0, 1], each group's sum >= 1)."""
    ws = x.ws
    m = groups.max1(x.value.real, ws.take((groups.n_groups,)))
    e = ws.take((x.rows,), x.a.dtype)
    groups.broadcast(m, e)
    np.subtract(x.value, e, out=e)
    np.exp(e, out=e)
    total = groups.sum1(e, ws.take((groups.n_groups,), x.a.dtype))
    return e, total, m


def _weighted_sum(groups: Groups, w: np.ndarray, A: np.ndarray, out: np.ndarray, ws) -> np.ndarray:
    """Per-group sums of w_r A_r: w (rows,), A (rows, C), out (n_groups, C)."""
    scratch = ws.take(A.shape, A.dtype)
    np.multiply(A, w[:, None], out=scratch)
    return groups.sum(scratch, out)


def group_softmax(x: Dual, groups: Groups) -> Dual:
    """s = exp(x) / (per-group sum of exp(x)), stable (rows, 1 + p).
    Tangent: ds = s * (dx - sum_group s dx)."""
    ws = x.ws
    e, total, _ = _shifted_exp(x, groups)
    out = x._new()
    s = out.value
    groups.broadcast(total, s)
    np.divide(e, s, out=s)
    xbar = _weighted_sum(groups, s, x.partials, ws.take((groups.n_groups, x.a.shape[1] - 1), x.a.dtype), ws)
    groups.broadcast(xbar, out.partials)
    np.subtract(x.partials, out.partials, out=out.partials)
    np.multiply(out.partials, s[:, None], out=out.partials)
    return out


def group_logsumexp(x: Dual, groups: Groups) -> Dual:
    """log sum_group exp(x) (n_groups, 1 + p), stable.  Tangent: sum_group softmax(x) dx."""
    ws = x.ws
    e, total, m = _shifted_exp(x, groups)
    out = x._new(rows=groups.n_groups)
    np.log(total, out=out.value)
    out.value[...] += m
    s = ws.take((x.rows,), x.a.dtype)
    groups.broadcast(total, s)
    np.divide(e, s, out=s)
    _weighted_sum(groups, s, x.partials, out.partials, ws)
    return out
