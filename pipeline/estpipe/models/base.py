"""What a model is: parameters -> choice probabilities, written once with the dual operations.

From the parameters (a dual block: values and partials) and a tile (kernel/tiles.py TileData: X,
the sets, each row's alternative id, each set's panel unit), a model returns the choice
probabilities of the tile's rows as a dual block. The default is the softmax, within each set, of
its `utilities`, so a model that only has utilities writes only those. The kernel seeds the
parameters, so the moments, their Jacobian and the reverse-mode product follow from the dual
operations' tangent rules: a new model costs no derivative work.

`needs` names what the data must have ("alt": alternative ids, "panel": panel units); a model is
refused, in one line naming the load option, on a file without them.
"""

from __future__ import annotations

import numpy as np

from estpipe.dual import Dual, broadcast, log, segment_logsumexp, segment_softmax


class Model:
    """Base class. Subclasses set `name`, `description` and implement `utilities` (or
    `probabilities`)."""

    name: str = ""
    description: str = ""
    needs: frozenset = frozenset()

    def bind(self, facts, **options) -> "Model":
        """This model for a file with these facts (x_names, alt_names, has_panel) and options; a
        model without options returns itself. A UserError names an option it does not take."""
        if options:
            from estpipe.errors import UserError, term

            names = ", ".join(term(k) for k in options)
            raise UserError(f"model {self.name} takes no {names}; {'they are' if len(options) > 1 else 'it is'} "
                            "for mixed-logit (random, draws) or nested-logit (nests)")
        return self

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

    def canonical_signs(self, params: np.ndarray) -> np.ndarray:
        """+-1 per parameter (P,): where a parameter and its negative give the same model (a
        random coefficient's sd), the sign the results report it with. Default: all +1."""
        return np.ones(len(params))

    def derived(self, params: np.ndarray) -> dict[str, float]:
        """Quantities on their natural scale that the results report beside the parameters (a
        nest's lambda = exp(theta), a lognormal coefficient's mean, ...), as functions of the
        parameters (P,): name -> value. Their standard errors come by the delta method."""
        return {}

    def derived_nulls(self) -> dict[str, float]:
        """The value each derived quantity's z test is against (default 0; a nest's lambda: 1)."""
        return {}

    def derived_notes(self, values: dict[str, float]) -> list[str]:
        """Lines the results add about derived values (e.g. a lambda above 1)."""
        return []

    def utilities(self, theta: Dual, tile) -> Dual:
        """Utilities of the tile's rows (rows, 1 + p) from theta (P, 1 + p) and the tile."""
        raise NotImplementedError

    def probabilities(self, theta: Dual, tile) -> Dual:
        """Choice probabilities of the tile's rows (rows, 1 + p): by default the softmax of the
        utilities within each set."""
        return segment_softmax(self.utilities(theta, tile), tile.seg)

    def log_probabilities(self, theta: Dual, tile) -> Dual:
        """log of the choice probabilities (rows, 1 + p), stable where they underflow: by default
        u - log sum_set exp(u); a model that overrides `probabilities` gets log(probabilities)
        unless it overrides this too."""
        if type(self).probabilities is not Model.probabilities:
            return log(self.probabilities(theta, tile))
        u = self.utilities(theta, tile)
        return u - broadcast(segment_logsumexp(u, tile.seg), tile.seg)

    def __repr__(self) -> str:
        return f"<model {self.name}>"
