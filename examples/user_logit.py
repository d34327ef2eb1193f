"""The textbook logit written as a user's model file: u = X @ b.

It is the built-in logit (tests/test_user_models.py checks that to 1e-8 in the estimates and
1e-12 in the Jacobian), but not its class, so the kernel runs it on the generic dual path every
model without a fused strategy uses. `estpipe bench --model examples/user_logit.py:UserLogit`
times that path against the fused logit kernel.
"""

from estpipe.dual import linear
from estpipe.models import Model


class UserLogit(Model):
    description = "u = X @ b, as a user's model (the generic dual path)"

    def utilities(self, theta, tile):
        return linear(tile.X, theta)
