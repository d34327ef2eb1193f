"""A logit whose coefficients are all negative: b = -exp(theta), u = X @ b.

For attributes whose effect must be negative (price, time, distance). It is nonlinear in its
parameters, and its derivatives come from the dual-block rules alone: this file holds no
derivative code.
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Dual, exp, linear
from estpipe.models.base import Model


class LogitSigned(Model):
    name = "logit-signed"
    description = "u = X @ b with b = -exp(theta): every coefficient negative"

    def param_names(self, x_names: list[str]) -> list[str]:
        return [f"log(-b_{name})" for name in x_names]

    def utilities(self, theta: Dual, tile) -> Dual:
        return linear(tile.X, -exp(theta))
