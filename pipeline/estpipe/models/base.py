"""What a model is: parameters -> utilities, written once with the dual-block operations.

A model only says how the utilities of a tile's rows depend on its parameters. The kernel seeds
the parameters as a dual block, so the moments, their Jacobian and the reverse-mode product
follow from the engine's tangent rules: a new model costs no derivative work.
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Dual, Segments


class Model:
    """Base class. Subclasses set `name`, `description` and implement `utilities`."""

    name: str = ""
    description: str = ""

    def n_params(self, K: int) -> int:
        """Number of parameters for K covariates."""
        return K

    def param_names(self, x_names: list[str]) -> list[str]:
        """Names of the parameters, from the covariate names (K,)."""
        return list(x_names)

    def param_columns(self, K: int) -> list[int | None]:
        """For each parameter, the column of X it multiplies in the utility (u = ... + x_k b_p),
        or None: the estimator takes that column's units as the parameter's scale (so a column
        in cents instead of dollars changes nothing but that parameter). Default: none."""
        return [None] * self.n_params(K)

    def start(self, K: int) -> np.ndarray:
        """Default start vector (n_params(K),)."""
        return np.zeros(self.n_params(K))

    def utilities(self, theta: Dual, X: np.ndarray, seg: Segments) -> Dual:
        """Utilities of the tile's rows (rows, 1 + p) from theta (P, 1 + p) and X (rows, K)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<model {self.name}>"
