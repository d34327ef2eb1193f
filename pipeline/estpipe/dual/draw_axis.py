"""Dual operations along a draw axis: blocks laid out draw-major, row r of draw b at b * rows + r.

A simulated model evaluates the same rows under B draws at once: `repeat_draws` copies a block of
rows for every draw, `sum_draws` and `mean_draws` reduce back to the rows. Each is linear, so its
tangent rule is the same operation on the partials.
"""

from __future__ import annotations

import numpy as np

from estpipe.dual.block import Dual


def repeat_draws(x: Dual, B: int) -> Dual:
    """x (rows, 1 + p) repeated for B draws: (B * rows, 1 + p).  Tangent: the same repeat."""
    out = x._new(rows=B * x.rows)
    out.a.reshape(B, x.rows, -1)[...] = x.a[None]
    return out


def sum_draws(x: Dual, B: int) -> Dual:
    """The sum over B draws of a draw-major (B * rows, 1 + p) block: (rows, 1 + p).  Tangent:
    the sum of the partials."""
    rows = x.rows // B
    out = x._new(rows=rows)
    np.sum(x.a.reshape(B, rows, -1), axis=0, out=out.a)
    return out


def mean_draws(x: Dual, B: int) -> Dual:
    """The mean over B draws: sum_draws(x, B) / B.  Tangent: the mean of the partials."""
    out = sum_draws(x, B)
    out.a *= 1.0 / B
    return out
