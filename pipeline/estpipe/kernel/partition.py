"""One partition's kernel: its data, resident, and what an evaluation returns (MomentSums).

Contract used by the execution back ends (do not change the signatures without updating them):

    k = PartitionKernel(data, model="logit", derivatives="dual", tile_rows=None)
    k.n_params                                   P, the model's parameter count
    k.sums(params, jacobian=True, covariance=False, clustered=True) -> MomentSums
    k.pullback(params, v) -> (P,)                sum_i (dh_i/db)' v, i.e. n G' v (reverse mode)
"""

from __future__ import annotations

import numpy as np

from estpipe.data.format import ChoiceData
from estpipe.errors import UserError
from estpipe.kernel.reference import logit_sums_reference
from estpipe.kernel.sums import MomentSums

DERIVATIVES = ("dual", "adjoint", "fd")


class PartitionKernel:
    def __init__(self, data: ChoiceData, model: str = "logit", derivatives: str = "dual", tile_rows: int | None = None):
        if model != "logit":
            raise UserError(f"unknown model {model!r}; allowed: logit")
        if derivatives not in DERIVATIVES:
            raise UserError(f"unknown derivatives {derivatives!r}; allowed: {', '.join(DERIVATIVES)}")
        self.data = data
        self.model = model
        self.derivatives = derivatives
        self.n_params = data.K

    def sums(self, params, jacobian: bool = True, covariance: bool = False, clustered: bool = True) -> MomentSums:
        d = self.data
        out = logit_sums_reference(
            np.asarray(params, dtype=np.float64), d.X, d.dm, d.offsets, chosen=d.chosen,
            cluster=d.cluster if clustered else None, covariance=covariance,
        )
        if not jacobian:
            out.gG = out.gG[:, :1].copy()
        return out

    def pullback(self, params, v) -> np.ndarray:
        sums = self.sums(params, jacobian=True)
        return sums.gG[:, 1:].T @ np.asarray(v, dtype=np.float64)
