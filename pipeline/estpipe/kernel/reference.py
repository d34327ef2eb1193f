"""A plain, unoptimized implementation of the logit moments and their sums.

It is the oracle the fast kernels are tested against: straightforward numpy, one line per
formula of DESIGN.md, no tiling, no buffers.
"""

from __future__ import annotations

import numpy as np

from estpipe.kernel.sums import MomentSums


def segment_softmax_reference(u: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Softmax of u (rows,) within each set of offsets (n_sets + 1,)."""
    starts = offsets[:-1]
    umax = np.maximum.reduceat(u, starts)
    sizes = np.diff(offsets)
    e = np.exp(u - np.repeat(umax, sizes))
    return e / np.repeat(np.add.reduceat(e, starts), sizes)


def logit_sums_reference(params, X, dm, offsets, chosen=None, cluster=None, covariance=True) -> MomentSums:
    """MomentSums of the logit model u = X @ params, with the Jacobian (dual block [s | ds/db])."""
    offsets = np.asarray(offsets, dtype=np.int64)
    starts, sizes = offsets[:-1], np.diff(offsets)
    s = segment_softmax_reference(X @ params, offsets)
    xbar = np.add.reduceat(s[:, None] * X, starts, axis=0)
    ds = s[:, None] * (X - np.repeat(xbar, sizes, axis=0))
    block = np.column_stack([s, ds])
    gG = dm.T @ block
    n = len(sizes)
    hh = nh = None
    nn, n_units = 0.0, 0
    if covariance:
        h = np.add.reduceat(s[:, None] * dm, starts, axis=0)  # (n, M)
        if cluster is None:
            hu, nu = h, np.ones(n)
        else:
            bounds = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
            hu, nu = np.add.reduceat(h, bounds, axis=0), np.diff(np.r_[bounds, n]).astype(float)
        hh, nh, nn, n_units = hu.T @ hu, nu @ hu, float(nu @ nu), len(nu)
    loglik = float(np.log(s[chosen.astype(bool)]).sum()) if chosen is not None else 0.0
    return MomentSums(n_sets=n, gG=gG, hh=hh, nh=nh, nn=nn, n_units=n_units, loglik=loglik)


def logit_moments_reference(params, X, dm, offsets):
    """(g, G) of DESIGN.md, computed plainly."""
    sums = logit_sums_reference(params, X, dm, offsets, covariance=False)
    return sums.g, sums.G
