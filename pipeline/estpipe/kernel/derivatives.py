"""Derivative modes (`derivatives=`), owned by the kernel that implements them, each an object
that composes the engine's passes (kernel/engine.py):

- dual: forward dual blocks; one GEMM per tile gives the moments and their Jacobian together.
  Its pullback is the forward projection of v'h (the same partials against w = dm v).
- adjoint: the reverse-mode gradient of v'h (pullback) without forming the Jacobian. Its value
  pass records the tape the reverse rule reads (the fused logit: the probabilities, 8 bytes per
  row). A model without a hand-written reverse rule gets its gradient through the forward
  projection, and `gradient_rule` says so.
- fd: one-sided finite differences, P + 1 value passes (the baseline).

`jacobian` says whether the mode gives the moment Jacobian G (an optimizer that needs G, like
Gauss-Newton, refuses a mode that does not).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from estpipe.kernel.request import JACOBIAN, Request
from estpipe.kernel.sums import MomentSums
from estpipe.registry import Registry

FD_STEP = float(np.sqrt(np.finfo(float).eps))


class DerivativeMode:
    name = ""
    description = ""
    jacobian = True  # gives the moment Jacobian G, not only a gradient

    def sums(self, kernel, request: Request) -> MomentSums:
        return kernel.forward(request)

    def pullback(self, kernel, request: Request, v: np.ndarray) -> np.ndarray:
        return kernel.forward_pullback(request, v)

    def gradient_rule(self, strategy, model) -> str:
        """How this mode's gradients come out with `strategy` (a class or instance) for `model`
        (for logs and results)."""
        return "forward projection of the dual partials"


class Dual(DerivativeMode):
    name = "dual"
    description = "dual blocks: moments and Jacobian in one GEMM"


class Adjoint(DerivativeMode):
    name = "adjoint"
    description = "reverse-mode gradient only; bfgs and l-bfgs-b"
    jacobian = False

    def sums(self, kernel, request: Request) -> MomentSums:
        return kernel.forward(request, record=not (request.jacobian or request.covariance))

    def pullback(self, kernel, request: Request, v: np.ndarray) -> np.ndarray:
        if kernel.strategy.reverse:
            return kernel.reverse_pullback(request, v)
        return kernel.forward_pullback(request, v)

    def gradient_rule(self, strategy, model) -> str:
        if strategy.reverse:
            return f"reverse rule of the {strategy.name} kernel"
        return (f"forward projection: model {model.name} has no reverse rule, so the adjoint's gradient "
                "comes from the dual partials of v'h")


class FiniteDifferences(DerivativeMode):
    name = "fd"
    description = "finite differences, the baseline"

    def sums(self, kernel, request: Request) -> MomentSums:
        if not request.jacobian:
            return kernel.forward(request)
        base = kernel.forward(request.without(JACOBIAN))
        params = np.asarray(request.params, dtype=np.float64)
        columns = [base.gG[:, 0]]
        value_only = request.without(JACOBIAN).without("covariance")
        for k in range(len(params)):
            h = float(request.fd_steps[k]) if request.fd_steps is not None else FD_STEP * max(1.0, abs(float(params[k])))
            step = params.copy()
            step[k] += h
            column = (kernel.forward(value_only.at(step)).gG[:, 0] - base.gG[:, 0]) / (step[k] - params[k])
            columns.append(column if request.seed_scale is None else column / request.seed_scale[k])
        base.gG = np.column_stack(columns)
        return base

    def pullback(self, kernel, request: Request, v: np.ndarray) -> np.ndarray:
        return self.sums(kernel, _with_jacobian(request)).gG[:, 1:].T @ v

    def gradient_rule(self, strategy, model) -> str:
        return "finite differences"


def _with_jacobian(request: Request) -> Request:
    return replace(request, needs=request.needs | {JACOBIAN})


DERIVATIVES: Registry[DerivativeMode] = Registry("derivatives", [Dual(), Adjoint(), FiniteDifferences()])
