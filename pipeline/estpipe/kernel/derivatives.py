"""Derivative modes (`derivatives=`), owned by the kernel that implements them.

- dual: forward dual blocks; one GEMM per tile gives the moments and their Jacobian together.
- adjoint: the reverse-mode gradient of a scalar v'h (pullback), no Jacobian formed; models
  without a hand-written reverse rule get it through the forward projection of v'h.
- fd: one-sided finite differences, P + 1 value evaluations (the baseline).

`jacobian` says whether the mode gives the moment Jacobian G (an optimizer that needs G, like
Gauss-Newton, refuses a mode that does not).
"""

from __future__ import annotations

from dataclasses import dataclass

from estpipe.registry import Registry


@dataclass(frozen=True)
class DerivativeMode:
    name: str
    description: str
    jacobian: bool  # gives the moment Jacobian G, not only a gradient


DERIVATIVES: Registry[DerivativeMode] = Registry("derivatives", [
    DerivativeMode("dual", "dual blocks: moments and Jacobian in one GEMM", jacobian=True),
    DerivativeMode("adjoint", "reverse-mode gradient only; bfgs and l-bfgs-b", jacobian=False),
    DerivativeMode("fd", "finite differences, the baseline", jacobian=True),
])
