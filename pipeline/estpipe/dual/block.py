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

    __slots__ = ("a", "ws", "seeded")

    def __init__(self, a: np.ndarray, ws: Workspace, seeded: "Seeded | None" = None):
        self.a = a
        self.ws = ws
        # set by `seed` (and kept by its row slices): the partials are the seed's sparse pattern,
        # so `linear` can copy columns instead of multiplying by them. Operations never write into
        # their inputs, so the pattern stays true of the block.
        self.seeded = seeded

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
            seeded = None
            if self.seeded is not None:
                start, _, step = index.indices(self.rows)
                seeded = self.seeded.shifted(start) if step == 1 else None
            return Dual(self.a[index], self.ws, seeded)
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
    """A constant as something that broadcasts against a (rows, 1 + p) block: scalar, or (rows, 1)
    (or (1, 1))."""
    c = np.asarray(c)
    return c if c.ndim == 0 else c.reshape(-1, 1)


def _dtype(x: Dual, c) -> np.dtype:
    return np.result_type(x.a.dtype, np.asarray(c).dtype)


def _rows(x: Dual, y) -> int:
    """Rows of x (op) y: a block of one row (a parameter, theta[k:k+1]) broadcasts against the
    rows of the other operand, as a scalar does, so `theta[0:1] * tile.x("cost")` is a column."""
    ny = y.rows if isinstance(y, Dual) else (int(np.shape(y)[0]) if np.ndim(y) else 1)
    if ny == x.rows or ny == 1:
        return x.rows
    if x.rows == 1:
        return ny
    raise ValueError(f"cannot combine a dual block of {x.rows} rows with one of {ny} rows (only 1 row broadcasts)")


# -- seeds ------------------------------------------------------------------------------------
class Seeded:
    """The partials of a seed's rows: row r of the block is parameter row0 + r, and partial j is
    d/dbeta_(k0 + j), equal to inv[j] (1 / scale) on the row of parameter k0 + j and 0 elsewhere."""

    __slots__ = ("row0", "k0", "k1", "inv")

    def __init__(self, row0: int, k0: int, k1: int, inv: np.ndarray | None):
        self.row0, self.k0, self.k1, self.inv = row0, k0, k1, inv

    def shifted(self, start: int) -> "Seeded":
        return Seeded(self.row0 + start, self.k0, self.k1, self.inv)


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
    inv = None if scale is None else 1.0 / np.asarray(scale, dtype=np.float64)[k0:k1]
    out.a[np.arange(k0, k1), 1 + np.arange(k1 - k0)] = 1 if inv is None else inv
    out.seeded = Seeded(0, k0, k1, inv)
    return out


# -- arithmetic -------------------------------------------------------------------------------
def add(x: Dual, y) -> Dual:
    """x + y.  Tangent: dx + dy (a constant y adds to the values only). A one-row operand
    broadcasts over the other's rows (here and in subtract and multiply)."""
    rows = _rows(x, y)
    if isinstance(y, Dual):
        out = x._new(rows=rows, dtype=np.result_type(x.a, y.a))
        np.add(x.a, y.a, out=out.a)
        return out
    out = x._new(rows=rows, dtype=_dtype(x, y))
    out.a[...] = x.a
    out.a[:, :1] += _column(y, rows)
    return out


def negative(x: Dual) -> Dual:
    """-x.  Tangent: -dx."""
    out = x._new()
    np.negative(x.a, out=out.a)
    return out


def subtract(x: Dual, y) -> Dual:
    """x - y.  Tangent: dx - dy."""
    if isinstance(y, Dual):
        out = x._new(rows=_rows(x, y), dtype=np.result_type(x.a, y.a))
        np.subtract(x.a, y.a, out=out.a)
        return out
    return add(x, -np.asarray(y))


def multiply(x: Dual, y) -> Dual:
    """x * y.  Tangent: y dx + x dy (a constant y scales values and partials alike)."""
    rows = _rows(x, y)
    if isinstance(y, Dual):
        out = x._new(rows=rows, dtype=np.result_type(x.a, y.a))
        np.multiply(x.partials, y.value[:, None], out=out.partials)
        out.partials[...] += y.partials * x.value[:, None]
        np.multiply(x.value, y.value, out=out.value)
        return out
    out = x._new(rows=rows, dtype=_dtype(x, y))
    np.multiply(x.a, _column(y, rows), out=out.a)
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
    One GEMM gives the values and the partials; when theta is a seed (or rows of one), dtheta is
    a scaled selection of columns, so the partials are X's columns times 1 / scale and only the
    values take a product (X @ theta: a GEMV, not a (rows, k) x (k, 1 + p) GEMM)."""
    out = Dual(theta.ws.take((X.shape[0], theta.a.shape[1]), np.result_type(X, theta.a)), theta.ws)
    seeded = theta.seeded
    if seeded is None or X.ndim != 2 or X.shape[1] != theta.rows:
        np.dot(X, theta.a, out=out.a)
        return out
    out.a[:, 0] = np.dot(X, theta.value, out=theta.ws.take((X.shape[0],), out.a.dtype))
    # partial j is d/dbeta_(k0 + j): column k0 + j - row0 of X (when theta has that row) / scale
    j0 = max(seeded.k0, seeded.row0) - seeded.k0
    j1 = min(seeded.k1, seeded.row0 + theta.rows) - seeded.k0
    part = out.partials
    if j1 <= j0:
        part[...] = 0
        return out
    c0 = seeded.k0 + j0 - seeded.row0
    if j0 > 0:
        part[:, :j0] = 0
    if j1 < part.shape[1]:
        part[:, j1:] = 0
    cols = X[:, c0 : c0 + (j1 - j0)]
    if seeded.inv is None:
        part[:, j0:j1] = cols
    else:
        np.multiply(cols, seeded.inv[j0:j1], out=part[:, j0:j1])
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


# |u| below this: exp(u) neither overflows nor makes a set's sum subnormal (kernel/fused_logit.py)
SAFE_EXPONENT = 600.0


def _shifted_exp(x: Dual, seg: Segments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exp(x - m_set) and its per-set sums, with m the per-set maximum of the real values (or 0
    when every |x| < SAFE_EXPONENT). The shift is a constant: it cancels from softmax and
    log-sum-exp and their tangents, and it keeps exp in [0, 1] (no overflow for any utility; the
    largest term is 1, so sums >= 1)."""
    ws = x.ws
    m = ws.take((seg.n_sets,))
    e = ws.take((x.rows,), x.a.dtype)
    real = x.value.real
    if x.rows and -SAFE_EXPONENT < real.min() and real.max() < SAFE_EXPONENT:
        # exp cannot overflow, and no set's sum falls below exp(-SAFE_EXPONENT), far above the
        # smallest normal number: the shift (two passes) can be skipped
        m[...] = 0
        np.exp(x.value, out=e)
    else:
        seg.max1(real, m)
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


def project_softmax(A: np.ndarray, u: Dual, seg: Segments, out: np.ndarray | None = None,
                    want_h: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """project(A, segment_softmax(u, seg)) without forming the softmax's partials: (m, 1 + p), and
    the per-set h_i = sum_set s A (n_sets, m) (computed whenever there are partials or want_h, else
    None; a workspace buffer, valid until the next reset).

    With s = softmax(u) per set and ubar_i = sum_set s du, the tangent rule ds = s (du - ubar_i)
    projects as

        A' ds = A' (s du) - sum_i h_i ubar_i'

    so one pass scales [1 | du] by s and ONE GEMM gives A' s and A' (s du); the correction is a
    small (m, n_sets) x (n_sets, p) product. (The fused logit kernel's rearrangement, for any
    utilities.) It asks its workspace for the same sequence of buffers whatever m is, so a kernel
    that calls it with A = dm and with A = dm v reuses the same buffers for the same kinds of
    arrays (the memory charge, execution/memory.py, extrapolates them)."""
    ws = u.ws
    dtype = np.result_type(A, u.a)
    n, m, p = seg.n_sets, A.shape[1], u.a.shape[1] - 1
    e, total, _ = _shifted_exp(u, seg)
    s = ws.take((u.rows,), u.a.dtype)
    seg.broadcast(total, s)
    np.divide(e, s, out=s)
    su = ws.take(u.a.shape, u.a.dtype)
    np.multiply(u.a, s[:, None], out=su)
    su[:, 0] = s
    if out is None:
        out = ws.take((m, 1 + p), dtype)
    # (su' A)' rather than A' su: the same GEMM, ~10% faster in OpenBLAS with both operands
    # transposed-contiguous (as in kernel/fused_logit.py)
    out[...] = np.dot(su.T, A, out=ws.take((1 + p, m), dtype)).T
    H = None
    if p or want_h:
        ubar = seg.sum(su[:, 1:], ws.take((n, p), u.a.dtype))
        H = seg.weighted_sum(s, A, ws.take((n, m), dtype), None if seg.equal_size else ws.take((u.rows, m), dtype))
        if p:
            out[:, 1:] -= np.dot(H.T, ubar, out=ws.take((m, p), dtype))
    return out, H
