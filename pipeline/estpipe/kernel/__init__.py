"""The moment kernel: per-partition additive sums of the moments and their Jacobian."""

from __future__ import annotations

import numpy as np

from estpipe.kernel.sums import MomentSums
from estpipe.kernel.partition import DERIVATIVES, PartitionKernel
from estpipe.kernel.reference import logit_moments_reference, logit_sums_reference


def logit_moments(params, X, dm, offsets, jacobian=True):
    """Mean moments g (M,) and their Jacobian G (M, K) (None when jacobian=False) of the logit model.

    params: (K,); X: (n_rows, K); dm: (n_rows, M); offsets: (n_sets + 1,). Uses the fast kernel."""
    from estpipe.data.format import ChoiceData

    data = ChoiceData(X=np.asarray(X, dtype=np.float64), dm=np.asarray(dm, dtype=np.float64),
                      offsets=np.asarray(offsets, dtype=np.int64))
    sums = PartitionKernel(data, model="logit").sums(np.asarray(params, dtype=np.float64), jacobian=jacobian)
    return sums.g, sums.G


__all__ = ["DERIVATIVES", "MomentSums", "PartitionKernel", "logit_moments", "logit_moments_reference", "logit_sums_reference"]
