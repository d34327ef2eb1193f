"""The textbook logit: u = X @ b."""

from __future__ import annotations

import numpy as np

from estpipe.dual import Dual, linear
from estpipe.models.base import Model


class Logit(Model):
    name = "logit"
    description = "u = X @ b; the kernel computes it on a hand-fused fast path, tested against this class"

    def param_columns(self, K: int) -> list[int | None]:
        return list(range(K))

    def utilities(self, theta: Dual, tile) -> Dual:
        return linear(tile.X, theta)
