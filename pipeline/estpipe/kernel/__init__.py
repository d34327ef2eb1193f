"""The moment kernel: per-partition additive sums of the moments and their Jacobian."""

from __future__ import annotations

from estpipe.kernel.sums import MomentSums
from estpipe.kernel.likelihood import LikelihoodSums
from estpipe.kernel.derivatives import DERIVATIVES
from estpipe.kernel.engine import PartitionKernel
from estpipe.kernel.reference import logit_moments_reference, logit_sums_reference
from estpipe.kernel.api import LogitMoments, logit_moments

__all__ = ["DERIVATIVES", "LikelihoodSums", "LogitMoments", "MomentSums", "PartitionKernel", "logit_moments", "logit_moments_reference",
           "logit_sums_reference"]
