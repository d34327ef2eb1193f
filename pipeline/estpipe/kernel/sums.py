"""The additive sums one partition returns (DESIGN.md: "everything a reducer needs is additive").

A partition never returns rows: only these sums. `a + b` is the sums of the union of two disjoint
sets of choice sets, so the reducer is plain addition and one partition equals many.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(eq=False)
class MomentSums:
    """Sums over the choice sets of one partition (or of many, once added).

    n_sets: number of sets.
    gG: (M, 1 + P) = sum_i [h_i | dh_i/db], i.e. n * [g | G]; (M, 1) when no Jacobian was asked.
    hh: (M, M) = sum over units u of h_u h_u' (units are sets, or clusters); None unless asked.
    nh: (M,) = sum over units of n_u h_u (n_u = sets in unit u; 1 without clusters); None unless asked.
    nn: sum over units of n_u^2; n_units: number of units.
    loglik: sum of log s over chosen rows (0.0 when the data have no `chosen`).
    moment_scale: (M,) R or None: hh and nh are then sums of R h_u (see `S_scaled`).
    The Jacobian columns are with respect to beta = seed_scale * b when the evaluation was asked
    with a seed scale (see PartitionKernel.sums).
    """

    n_sets: int
    gG: np.ndarray
    hh: np.ndarray | None = None
    nh: np.ndarray | None = None
    nn: float = 0.0
    n_units: int = 0
    loglik: float = 0.0
    moment_scale: np.ndarray | None = None

    def restricted(self, free: np.ndarray) -> "MomentSums":
        """The sums with the Jacobian's columns of the parameters `free` only (the others held
        fixed: estimation.gmm.FixedParameters)."""
        if self.gG.shape[1] <= 1:
            return self
        return replace(self, gG=self.gG[:, np.r_[0, 1 + np.asarray(free)]])

    def __add__(self, other: "MomentSums") -> "MomentSums":
        if isinstance(other, int) and other == 0:  # lets sum() start from 0
            return self

        def add(a, b):
            return None if a is None or b is None else a + b

        return MomentSums(
            n_sets=self.n_sets + other.n_sets,
            gG=self.gG + other.gG,
            hh=add(self.hh, other.hh),
            nh=add(self.nh, other.nh),
            nn=self.nn + other.nn,
            n_units=self.n_units + other.n_units,
            loglik=self.loglik + other.loglik,
            moment_scale=self.moment_scale,
        )

    __radd__ = __add__

    # -- what the reducer derives -------------------------------------------------------------
    @property
    def g(self) -> np.ndarray:
        """Mean moments (M,)."""
        return self.gG[:, 0] / self.n_sets

    @property
    def G(self) -> np.ndarray | None:
        """Moment Jacobian (M, P), or None when it was not computed."""
        return self.gG[:, 1:] / self.n_sets if self.gG.shape[1] > 1 else None

    @property
    def S_scaled(self) -> np.ndarray:
        """R S R (M, M), the centered moment covariance of R h (R = moment_scale, ones when None):
        (1/n) sum_u (R h_u - n_u R g)(R h_u - n_u R g)'. Its squares never overflow for moments
        in huge units, which S itself may."""
        if self.hh is None:
            raise ValueError("these sums were computed without covariance=True")
        g = self.g if self.moment_scale is None else self.g * self.moment_scale
        outer = np.outer(self.nh, g)
        return (self.hh - outer - outer.T + self.nn * np.outer(g, g)) / self.n_sets

    @property
    def S(self) -> np.ndarray:
        """Centered moment covariance (M, M): (1/n) sum_u (h_u - n_u g)(h_u - n_u g)'."""
        S = self.S_scaled
        if self.moment_scale is None:
            return S
        inv = 1.0 / self.moment_scale
        return S * np.outer(inv, inv)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.gG, self.hh, self.nh) if a is not None) + 32
