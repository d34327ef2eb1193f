"""Forward-mode dual blocks: values and their partials side by side in one array.

A `Dual` holds `a`: (rows, 1 + p), with a[:, 0] the values and a[:, 1:] the partials with
respect to p parameters (a chunk of them). Every operation writes its result into a buffer from
the block's `Workspace`, so an evaluation allocates nothing once the buffers exist. Each primitive
states its tangent rule beside it (JAX style: one rule per primitive). The primitives also work
on complex blocks, which gives complex-step derivatives of any model for free in the tests.

The heavy step is `project(A, x) = A' x.a`: ONE BLAS GEMM that yields the projected values and
their partials together, which is what keeps forward mode as fast as BLAS (DESIGN.md).
"""

from __future__ import annotations

import numpy as np

from estpipe.dual.segments import Segments
from estpipe.dual.workspace import Workspace


class Dual:
    """Values and partials of `rows` quantities: a (rows, 1 + p); ws: where results are put."""

    __slots__ = ("a", "ws")

    def __init__(self, a: np.ndarray, ws: Workspace):
        self.a = a
        self.ws = ws

    @property
    def value(self) -> np.ndarray:
        """(rows,)"""
        return self.a[:, 0]

    @property
    def partials(self) -> np.ndarray:
        """(rows, p)"""
        return self.a[:, 1:]

    @property
    def rows(self) -> int:
        return self.a.shape[0]

    def _new(self, rows: int | None = None, dtype=None) -> "Dual":
        return Dual(self.ws.take((self.rows if rows is None else rows, self.a.shape[1]), dtype or self.a.dtype), self.ws)

    def __getitem__(self, index) -> "Dual":
        """Rows of the block (a fancy index copies into a workspace buffer)."""
        if isinstance(index, slice):
            return Dual(self.a[index], self.ws)
        index = np.asarray(index)
        out = self._new(rows=len(index))
        np.take(self.a, index, axis=0, out=out.a)
        return out

    __add__ = lambda self, y: add(self, y)
    __radd__ = lambda self, y: add(self, y)
    __sub__ = lambda self, y: subtract(self, y)
    __rsub__ = lambda self, y: add(negative(self), y)
    __mul__ = lambda self, y: multiply(self, y)
    __rmul__ = lambda self, y: multiply(self, y)
    __truediv__ = lambda self, y: divide(self, y)
    __rtruediv__ = lambda self, y: multiply(reciprocal(self), y)
    __neg__ = lambda self: negative(self)
    __pow__ = lambda self, p: power(self, p)


def _column(c, rows: int):
    """A constant as something that broadcasts against a (rows, 1 + p) block: scalar or (rows, 1)."""
    c = np.asarray(c)
    return c if c.ndim == 0 else c.reshape(rows, 1)


def _dtype(x: Dual, c) -> np.dtype:
    return np.result_type(x.a.dtype, np.asarray(c).dtype)


# -- seeds ------------------------------------------------------------------------------------
def seed(params: np.ndarray, ws: Workspace, k0: int = 0, k1: int | None = None,
         scale: np.ndarray | None = None) -> Dual:
    """Parameters (P,) as a dual block (P, 1 + (k1 - k0)): d params_k / d beta_j = 1 / scale_j
    if k == j, for j in the chunk [k0, k1), with beta = scale * params (scale (P,) positive,
    default ones). Every partial downstream is then with respect to beta: seeding 1 / scale
    costs nothing and keeps partials of data in large units (x ~ 1e150) from overflowing."""
    params = np.asarray(params)
    P = len(params)
    k1 = P if k1 is None else k1
    out = Dual(ws.take((P, 1 + k1 - k0), np.result_type(params.dtype, np.float64)), ws)
    out.a[...] = 0
    out.a[:, 0] = params
    out.a[np.arange(k0, k1), 1 + np.arange(k1 - k0)] = 1 if scale is None else 1.0 / np.asarray(scale)[k0:k1]
    return out


# -- arithmetic -------------------------------------------------------------------------------
def add(x: Dual, y) -> Dual:
    """x + y.  Tangent: dx + dy (a constant y adds to the values only)."""
    if isinstance(y, Dual):
        out = x._new(dtype=np.result_type(x.a, y.a))
        np.add(x.a, y.a, out=out.a)
        return out
    out = x._new(dtype=_dtype(x, y))
    out.a[...] = x.a
    out.a[:, :1] += _column(y, x.rows)
    return out


def negative(x: Dual) -> Dual:
    """-x.  Tangent: -dx."""
    out = x._new()
    np.negative(x.a, out=out.a)
    return out


def subtract(x: Dual, y) -> Dual:
    """x - y.  Tangent: dx - dy."""
    if isinstance(y, Dual):
        out = x._new(dtype=np.result_type(x.a, y.a))
        np.subtract(x.a, y.a, out=out.a)
        return out
    return add(x, -np.asarray(y))


def multiply(x: Dual, y) -> Dual:
    """x * y.  Tangent: y dx + x dy (a constant y scales values and partials alike)."""
    if isinstance(y, Dual):
        out = x._new(dtype=np.result_type(x.a, y.a))
        np.multiply(x.partials, y.value[:, None], out=out.partials)
        out.partials[...] += y.partials * x.value[:, None]
        np.multiply(x.value, y.value, out=out.value)
        return out
    out = x._new(dtype=_dtype(x, y))
    np.multiply(x.a, _column(y, x.rows), out=out.a)
    return out


def reciprocal(x: Dual) -> Dual:
    """1 / x.  Tangent: -dx / x^2."""
    out = x._new()
    np.divide(1.0, x.value, out=out.value)
    np.multiply(x.partials, -(out.value * out.value)[:, None], out=out.partials)
    return out


def divide(x: Dual, y) -> Dual:
    """x / y.  Tangent: (dx - (x / y) dy) / y, through x * (1 / y)."""
    if isinstance(y, Dual):
        return multiply(x, reciprocal(y))
    return multiply(x, 1.0 / np.asarray(y))


def exp(x: Dual) -> Dual:
    """exp(x).  Tangent: exp(x) dx."""
    out = x._new()
    np.exp(x.value, out=out.value)
    np.multiply(x.partials, out.value[:, None], out=out.partials)
    return out


def log(x: Dual) -> Dual:
    """log(x).  Tangent: dx / x."""
    out = x._new()
    np.log(x.value, out=out.value)
    np.divide(x.partials, x.value[:, None], out=out.partials)
    return out


def power(x: Dual, p) -> Dual:
    """x ** p for a constant p (scalar or (rows,)).  Tangent: p x^(p - 1) dx."""
    p = np.asarray(p)
    out = x._new(dtype=_dtype(x, p))
    np.power(x.value, p, out=out.value)
    np.multiply(x.partials, (p * np.power(x.value, p - 1))[:, None], out=out.partials)
    return out


# -- linear maps: one GEMM each ------------------------------------------------------------------
def linear(X: np.ndarray, theta: Dual) -> Dual:
    """X @ theta for a constant X (rows, k) and a dual theta (k, 1 + p).  Tangent: X dtheta.
    One GEMM gives the values and the partials."""
    out = Dual(theta.ws.take((X.shape[0], theta.a.shape[1]), np.result_type(X, theta.a)), theta.ws)
    np.dot(X, theta.a, out=out.a)
    return out


def project(A: np.ndarray, x: Dual, out: np.ndarray | None = None) -> np.ndarray:
    """A' x for a constant A (rows, m) and a dual x (rows, 1 + p): (m, 1 + p), column 0 the
    values and the rest their partials.  Tangent: A' dx.  ONE GEMM for values and partials."""
    if out is None:
        out = x.ws.take((A.shape[1], x.a.shape[1]), np.result_type(A, x.a))
    return np.dot(A.T, x.a, out=out)


# -- operations over the sets of a tile (CSR offsets) ----------------------------------------------
def segment_sum(x: Dual, seg: Segments) -> Dual:
    """Per-set sums (n_sets, 1 + p).  Tangent: the per-set sums of dx (it is linear)."""
    out = x._new(rows=seg.n_sets)
    seg.sum(x.a, out.a)
    return out


def broadcast(x: Dual, seg: Segments) -> Dual:
    """A per-set dual (n_sets, 1 + p) repeated on the rows of each set.  Tangent: the same repeat."""
    out = x._new(rows=seg.n_rows)
    seg.broadcast(x.a, out.a)
    return out


def segment_max(x: Dual, seg: Segments) -> Dual:
    """Per-set maxima (n_sets, 1 + p), by real part.  Tangent: dx at the (first) maximising row;
    it is the derivative wherever the maximum is unique."""
    return x[seg.argmax1(x.value.real)]


def _shifted_exp(x: Dual, seg: Segments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exp(x - m_set) and its per-set sums, with m the per-set maximum of the real values.
    The shift is a constant: it cancels from softmax and log-sum-exp and their tangents, and it
    keeps exp in [0, 1] (no overflow for any utility; the largest term is 1, so sums >= 1)."""
    ws = x.ws
    m = seg.max1(x.value.real, ws.take((seg.n_sets,)))
    e = ws.take((x.rows,), x.a.dtype)
    seg.broadcast(m, e)
    np.subtract(x.value, e, out=e)
    np.exp(e, out=e)
    total = seg.sum1(e, ws.take((seg.n_sets,), x.a.dtype))
    return e, total, m


def segment_softmax(x: Dual, seg: Segments) -> Dual:
    """s = exp(x) / (per-set sum of exp(x)), stable.  Tangent: ds = s * (dx - sum_set s dx)."""
    ws = x.ws
    e, total, _ = _shifted_exp(x, seg)
    out = x._new()
    s = out.value
    seg.broadcast(total, s)
    np.divide(e, s, out=s)
    xbar = seg.weighted_sum(s, x.partials, ws.take((seg.n_sets, x.a.shape[1] - 1), x.a.dtype), out.partials)
    seg.broadcast(xbar, out.partials)
    np.subtract(x.partials, out.partials, out=out.partials)
    np.multiply(out.partials, s[:, None], out=out.partials)
    return out


def segment_logsumexp(x: Dual, seg: Segments) -> Dual:
    """log sum_set exp(x) (n_sets, 1 + p), stable.  Tangent: sum_set softmax(x) dx."""
    ws = x.ws
    e, total, m = _shifted_exp(x, seg)
    out = x._new(rows=seg.n_sets)
    np.log(total, out=out.value)
    out.value[...] += m
    s = ws.take((x.rows,), x.a.dtype)
    seg.broadcast(total, s)
    np.divide(e, s, out=s)
    seg.weighted_sum(s, x.partials, out.partials, ws.take((x.rows, x.a.shape[1] - 1), x.a.dtype))
    return out
