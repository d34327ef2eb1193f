"""What one evaluation needs, named once: the kernel answers a Request with additive sums.

A request names the quantities it needs (`needs`), so the protocol grows by new names, not by
new flags: today "moments" (always), "jacobian" (the partials of the moments, by the derivative
mode) "covariance" (the per-unit sums S needs, and the log-likelihood of the chosen rows) and
"likelihood" (answered alone, by kernel/likelihood.py's LikelihoodSums: the log-likelihood, and
with "score" the score sum, with "opg" the OPG per unit and per cluster, for the MLE).
The scales and steps say in which units the answer comes (DESIGN.md, "Units").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

MOMENTS = "moments"
JACOBIAN = "jacobian"
COVARIANCE = "covariance"
LIKELIHOOD = "likelihood"
SCORE = "score"  # with likelihood: the score sum
OPG = "opg"  # with likelihood: the per-unit (and per-cluster) score outer products
HESSIAN = "hessian"  # with likelihood: the exact Hessian, where the kernel has one (the textbook logit, a normal mixed logit)
QUANTITIES = (MOMENTS, JACOBIAN, COVARIANCE, LIKELIHOOD, SCORE, OPG, HESSIAN)


@dataclass(frozen=True, eq=False)
class Request:
    """params: (P,) the model's parameters (complex for complex-step derivatives); needs: the
    quantities asked for; clustered: covariance units are the file's clusters when it has them;
    seed_scale: (P,) partials are with respect to beta = seed_scale * params; moment_scale: (M,)
    R, the unit sums are of R h; fd_steps: (P,) finite-difference steps in the units of params;
    precision: "double", or "single" for a float32 Jacobian GEMM (search directions only)."""

    params: np.ndarray
    needs: frozenset = field(default_factory=lambda: frozenset({MOMENTS, JACOBIAN}))
    clustered: bool = True
    seed_scale: np.ndarray | None = None
    moment_scale: np.ndarray | None = None
    fd_steps: np.ndarray | None = None
    precision: str = "double"

    def __post_init__(self):
        unknown = set(self.needs) - set(QUANTITIES)
        if unknown:
            raise ValueError(f"unknown quantities {sorted(unknown)}; a request may need {', '.join(QUANTITIES)}")
        if self.precision not in ("double", "single"):
            raise ValueError(f"precision must be 'double' or 'single', got {self.precision!r}")
        object.__setattr__(self, "needs", frozenset(self.needs) | {MOMENTS})
        for name in ("seed_scale", "moment_scale", "fd_steps"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, np.asarray(value, dtype=np.float64))

    @classmethod
    def of(cls, params, jacobian: bool = True, covariance: bool = False, **kwargs) -> "Request":
        needs = {MOMENTS} | ({JACOBIAN} if jacobian else set()) | ({COVARIANCE} if covariance else set())
        return cls(params=np.asarray(params), needs=frozenset(needs), **kwargs)

    @property
    def jacobian(self) -> bool:
        return JACOBIAN in self.needs

    @property
    def covariance(self) -> bool:
        return COVARIANCE in self.needs

    @property
    def likelihood(self) -> bool:
        return LIKELIHOOD in self.needs

    @classmethod
    def for_likelihood(cls, params, clustered: bool = True, seed_scale=None, score: bool = True,
                       opg: bool = True, hessian: bool = False) -> "Request":
        """The log-likelihood; with `score` its gradient; with `opg` (implies score) the score
        outer products per unit and cluster (BHHH's curvature, the sandwich's meat); with
        `hessian` the exact Hessian where the kernel has one (else the sums hold None)."""
        needs = ({LIKELIHOOD} | ({SCORE} if score or opg else set()) | ({OPG} if opg else set())
                 | ({HESSIAN} if hessian else set()))
        return cls(params=np.asarray(params), needs=frozenset(needs), clustered=clustered, seed_scale=seed_scale)

    @property
    def score(self) -> bool:
        return SCORE in self.needs

    @property
    def opg(self) -> bool:
        return OPG in self.needs

    @property
    def hessian(self) -> bool:
        return HESSIAN in self.needs

    @property
    def complex_step(self) -> bool:
        return np.iscomplexobj(self.params)

    @property
    def inv_seed_scale(self) -> np.ndarray | None:
        return None if self.seed_scale is None else 1.0 / self.seed_scale

    def without(self, quantity: str) -> "Request":
        return replace(self, needs=self.needs - {quantity})

    def at(self, params) -> "Request":
        return replace(self, params=np.asarray(params))
