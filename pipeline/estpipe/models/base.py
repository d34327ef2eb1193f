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
    # True when the first K parameters are the logit's coefficients and `start` makes the model
    # the logit for the others: the estimator then starts them from a one-step logit fit
    # (estimation.gmm.logit_start), for a model that b = 0 cannot start (the nested logit).
    logit_start: bool = False
    # A simulated model's likelihood is not the log of its probabilities at the chosen rows but the
    # log of a mean over draws per decision maker (kernel/fused_mixed.py simulated_likelihood_tile).
    simulated: bool = False

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
        u = self.utilities(theta, tile)
        check_block(self, "utilities", u, theta, tile)
        return segment_softmax(u, tile.seg)

    def log_probabilities(self, theta: Dual, tile) -> Dual:
        """log of the choice probabilities (rows, 1 + p), stable where they underflow: by default
        u - log sum_set exp(u); a model that overrides `probabilities` gets log(probabilities)
        unless it overrides this too."""
        if type(self).probabilities is not Model.probabilities:
            return log(self.probabilities(theta, tile))
        u = self.utilities(theta, tile)
        check_block(self, "utilities", u, theta, tile)
        return u - broadcast(segment_logsumexp(u, tile.seg), tile.seg)

    def __repr__(self) -> str:
        return f"<model {self.name}>"


def call_model(model: Model, method: str, theta: Dual, tile) -> Dual:
    """model.<method>(theta, tile) ("probabilities" or "log_probabilities"), as the kernel calls it:
    a user's model (one not in estpipe) that raises gives a UserError naming its file, line and
    exception, and any model's result must be a Dual of the tile's rows and theta's width (a
    UserError saying what came back). estpipe's own models raise as they are (an internal error)."""
    try:
        out = getattr(model, method)(theta, tile)
    except Exception as exc:
        from estpipe.errors import UserError
        from estpipe.models.user import model_error, model_source_file

        if isinstance(exc, UserError) or model_source_file(model) is None:
            raise
        raise model_error(model, method, exc) from None
    check_block(model, method, out, theta, tile)
    return out


def check_block(model: Model, method: str, out, theta: Dual, tile) -> None:
    """A UserError unless `out` is a Dual (rows, 1 + p): one value per row of the tile, with
    theta's partials."""
    shape = (tile.seg.n_rows, theta.a.shape[1])
    if isinstance(out, Dual) and out.a.shape == shape:
        return
    from estpipe.errors import UserError

    got = (f"a Dual block of shape {out.a.shape}" if isinstance(out, Dual)
           else f"{type(out).__name__}{f' of shape {np.shape(out)}' if hasattr(out, 'shape') else ''}, not a Dual")
    raise UserError(f"model {model.name}: {method}(theta, tile) returned {got}; it must return a Dual of shape "
                    f"{shape}: one value per row of the tile ({shape[0]} rows) with theta's {shape[1] - 1} partials, "
                    "built from theta with the estpipe.dual operations (e.g. linear(tile.X, theta))")
