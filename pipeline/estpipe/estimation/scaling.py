"""The units the estimator works in, so that no decision depends on the data's own units.

Three diagonal scales, fixed at the start of a run (and kept in its checkpoint):

- seed s (P,): the kernel's partials are with respect to beta = s b (DESIGN.md, "Units"); powers
  of two from the largest |x| of the column a parameter multiplies (1 for parameters that map to
  no column), so partials of data in huge units stay in range and scaling is exact;
- params D (P,): the optimizer's standardized parameters theta = D b; D = s c with c the column
  norms of the scaled moment Jacobian at the start (Jacobi scaling), so every column of the
  Jacobian the optimizer sees has norm 1 there, whatever the units of x. Tolerances and
  finite-difference steps are on theta;
- moments R (M,): the estimator's scaled moments g~ = R g; powers of two from the largest |dm|
  of each column, so the moment covariance's squares never overflow.

Rescaling a column of X by any factor rescales s and D by that factor (up to rounding) and leaves
theta, and so the optimizer's path, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estpipe.estimation.linalg import pow2

FD_STEP = float(np.sqrt(np.finfo(float).eps))


@dataclass
class Scaling:
    """seed s (P,), params D (P,), moments R (M,); see the module docstring."""

    seed: np.ndarray
    params: np.ndarray
    moments: np.ndarray
    seed_x: np.ndarray | None = None  # (K,) the powers of two of max |x| per column of X

    @classmethod
    def from_data(cls, param_columns: list[int | None], x_absmax: np.ndarray, dm_absmax: np.ndarray) -> "Scaling":
        """s from max |x| of each parameter's column, R = 1 / (max |dm| per column); D = s until
        `standardize` sets it from the Jacobian at the start."""
        x_scale = pow2(x_absmax)
        seed = np.array([x_scale[k] if k is not None else 1.0 for k in param_columns])
        moments = 1.0 / pow2(dm_absmax)
        return cls(seed=seed, params=seed.copy(), moments=moments, seed_x=x_scale)

    def standardize(self, G_beta: np.ndarray) -> None:
        """D = s c, c_k = the norm of column k of R G_beta (G_beta (M, P): dg/dbeta at the start).
        A column that is zero (a parameter the moments do not see there) keeps c_k = 1."""
        norms = np.linalg.norm(self.moments[:, None] * G_beta, axis=0)
        top = float(norms.max(initial=0.0))
        ok = np.isfinite(norms) & (norms > 1e-300) & (norms > 1e-14 * top)
        c = np.where(ok, norms, 1.0)
        self.params = self.seed * c

    # -- conversions -------------------------------------------------------------------------------
    def theta(self, b: np.ndarray) -> np.ndarray:
        return np.asarray(b, dtype=np.float64) * self.params

    def b(self, theta: np.ndarray) -> np.ndarray:
        return np.asarray(theta, dtype=np.float64) / self.params

    def g_scaled(self, g: np.ndarray) -> np.ndarray:
        """g~ = R g (M,)."""
        return g * self.moments

    def jacobian_theta(self, G_beta: np.ndarray) -> np.ndarray:
        """dg~/dtheta = R G_beta s / D (M, P) from the kernel's dg/dbeta."""
        return self.moments[:, None] * G_beta * (self.seed / self.params)[None, :]

    def covariance_b(self, V_theta: np.ndarray) -> np.ndarray:
        """The covariance of b from that of theta: V_theta / (D_j D_k)."""
        return V_theta / np.outer(self.params, self.params)

    def fd_steps(self, b: np.ndarray) -> np.ndarray:
        """Finite-difference steps in b's units: sqrt(eps) max(1, |theta_k|) on theta."""
        theta = self.theta(b)
        return FD_STEP * np.maximum(1.0, np.abs(theta)) / self.params

    def to_dict(self) -> dict:
        return {"seed": self.seed.tolist(), "params": self.params.tolist(), "moments": self.moments.tolist(),
                "seed_x": self.seed_x.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scaling":
        return cls(seed=np.array(d["seed"], dtype=np.float64), params=np.array(d["params"], dtype=np.float64),
                   moments=np.array(d["moments"], dtype=np.float64), seed_x=np.array(d["seed_x"], dtype=np.float64))
