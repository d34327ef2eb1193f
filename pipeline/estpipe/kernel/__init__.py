"""The moment kernel: per-partition additive sums of the moments and their Jacobian."""

from estpipe.kernel.sums import MomentSums
from estpipe.kernel.partition import DERIVATIVES, PartitionKernel
from estpipe.kernel.reference import logit_moments_reference, logit_sums_reference


def logit_moments(params, X, dm, offsets, jacobian=True):
    """Mean moments g (M,) and their Jacobian G (M, K) (None when jacobian=False) of the logit model."""
    g, G = logit_moments_reference(params, X, dm, offsets)
    return g, (G if jacobian else None)


__all__ = ["DERIVATIVES", "MomentSums", "PartitionKernel", "logit_moments", "logit_moments_reference", "logit_sums_reference"]
