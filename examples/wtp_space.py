"""A logit in willingness-to-pay space, written as a user's model: no derivative code.

    u_ij = alpha * (-cost_ij + sum_k w_k x_ijk),   alpha = exp(log_alpha) > 0

alpha is the marginal utility of money (the cost coefficient is -alpha, negative by
construction), and w_k is the willingness to pay for one unit of attribute k, in the units of the
cost (dollars per minute, for a time). It is the logit reparametrized (b_cost = -alpha,
b_k = alpha w_k), so its estimates equal the logit's after that change; what it adds is the WTPs
and their standard errors directly, instead of ratios of coefficients.

    estpipe estimate modechoice.h5 --model examples/wtp_space.py:WtpSpace

The cost is the x column named COST (change it to your data's). estpipe seeds theta, and the
dual operations below carry the partials; the moments' Jacobian follows from their rules.
"""

from __future__ import annotations

import math

from estpipe.dual import exp, linear
from estpipe.errors import UserError
from estpipe.models import Model

COST = "invc"
# alpha at the start: utilities of order 1 for costs of tens of dollars (at alpha = 1 one
# alternative of each set would have probability ~1, and the moments would not move)
START_ALPHA = 0.02


class WtpSpace(Model):
    description = "logit in willingness-to-pay space: u = alpha (-cost + x'w)"

    def __init__(self, x_names=()):
        self.x_names = list(x_names)

    def bind(self, facts, **options):
        """This model for the file's x columns: the cost must be one of them."""
        super().bind(facts, **options)  # refuses options it does not take
        if COST not in facts.x_names:
            raise UserError(f"model WtpSpace needs the cost column {COST!r} among the x columns "
                            f"({', '.join(facts.x_names)}); load the data with --x {COST},... or set COST in {__file__}")
        bound = WtpSpace(facts.x_names)
        bound.name = self.name
        return bound

    @property
    def others(self) -> list[int]:
        """The x columns other than the cost."""
        return [k for k, name in enumerate(self.x_names) if name != COST]

    def param_names(self, x_names):
        return ["log_alpha"] + [f"wtp_{x_names[k]}" for k in self.others]

    def start(self, K):
        return [math.log(START_ALPHA)] + [0.0] * (K - 1)

    def utilities(self, theta, tile):
        alpha = exp(theta[0:1])  # one row: broadcasts over the tile's rows
        v = linear(tile.X[:, self.others], theta[1:])  # sum_k w_k x_k
        return (v - tile.x(COST)) * alpha

    def derived(self, params):
        """The preference-space coefficients, with delta-method standard errors."""
        alpha = math.exp(params[0])
        out = {"alpha": alpha, f"b_{COST}": -alpha}
        for w, k in zip(params[1:], self.others):
            out[f"b_{self.x_names[k]}"] = alpha * float(w)
        return out

    def derived_nulls(self):
        return {"alpha": 0.0}

