"""The nested logit in its random-utility form, RU2 (DESIGN.md, "Nested logit").

With V_j = x_j'b and lambda_k the parameter of j's nest k,

    P_j = exp(V_j / l_k) I_k^(l_k - 1) / sum_m I_m^(l_m),   I_k = sum_{i in k, present} exp(V_i / l_k)

that is P_j = q_j Q_k: q_j the softmax of V / l_k within the nest (in the set), Q_k the softmax
over the set's nests of l_k log I_k (Train, Discrete Choice Methods with Simulation, ch. 4;
Koppelman and Wen 1998). Utilities are divided by lambda inside the nest and the inclusive value
multiplied by lambda above, so lambda = 1 for every nest is the logit. Alternatives named in no
nest are their own (degenerate) nest, and a nest with one alternative has no parameter (lambda
drops out of it). A set without some alternatives simply has no rows for them; a nest with no
present alternative contributes nothing.

Parameters, in order: the K coefficients b (named as the x columns), then for each nest with at
least two alternatives, in the order given, "log_lambda_<nest>" = theta_k, lambda_k = exp(theta_k)
(unrestricted; start theta = 0, the logit). Results also give lambda_<nest> with a z test against
1; lambda > 1 is flagged (not consistent with utility maximization for all x).

`probabilities` here is the reference, written with the dual operations over groups of rows
(dual/groups.py); the kernel's fused strategy (kernel/fused_nested.py) computes the same sums
with the partials in closed form, and is tested equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from estpipe.dual import (Dual, Groups, broadcast, exp, group_broadcast, group_logsumexp, group_softmax, linear,
                          segment_logsumexp, segment_softmax)
from estpipe.errors import UserError, term
from estpipe.models.base import Model

NEEDS_ALT = "nested logit needs each row's alternative id, and {what} has none; load it with `estpipe load --alt-col COLUMN` (the column naming the alternative)"


@dataclass(frozen=True)
class Nest:
    name: str
    alternatives: tuple[int, ...]  # codes into the file's alt_names

    @property
    def has_parameter(self) -> bool:
        return len(self.alternatives) >= 2


def parse_nests(text: str, alt_names: list[str]) -> list[Nest]:
    """'public=train,bus; private=car' -> the nests, refusing unknown alternatives, an alternative
    in two nests, a nest named twice and parts that are not name=alternatives."""
    alt_names = [str(a) for a in alt_names]
    nests: list[Nest] = []
    owner: dict[str, str] = {}
    for part in [p.strip() for p in str(text).split(";") if p.strip()]:
        name, eq, alts = part.partition("=")
        name = name.strip()
        words = [w.strip() for w in alts.split(",") if w.strip()]
        if not eq or not name or not words:
            raise UserError(f"{term('nests')}: {part!r} is not name=alternatives; write the nests as "
                            f"\"public=train,bus; private=car\"")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"{term('nests')}: the nest name {name!r} must be letters, digits, '_' or '-'")
        if any(n.name == name for n in nests):
            raise UserError(f"{term('nests')}: the nest {name} is named twice; give each nest once")
        codes = []
        for w in words:
            if w not in alt_names:
                raise UserError(f"{term('nests')}: nest {name} names {w!r}, which is not an alternative of the file; "
                                f"its alternatives are: {', '.join(alt_names)}")
            if w in owner:
                where = "twice in nest " + name if owner[w] == name else f"in nests {owner[w]} and {name}"
                raise UserError(f"{term('nests')}: the alternative {w} is {where}; put each alternative in one nest")
            owner[w] = name
            codes.append(alt_names.index(w))
        nests.append(Nest(name, tuple(codes)))
    if not nests:
        raise UserError(f"{term('nests')} names no nest; give them as {term('nests')} \"public=train,bus; private=car\"")
    return nests


# A lambda beyond [1e-3, 1e3] has run to where the probabilities no longer move with it.
BOUNDARY_LAMBDA = 1e-3


class NestedLogit(Model):
    name = "nested-logit"
    description = "nests of alternatives with a lambda each (RU2 form; alternatives in no nest are their own)"
    needs = frozenset({"alt"})
    logit_start = True  # b = 0 cannot start it: the coefficients come from a one-step logit fit

    def __init__(self, x_names=(), alt_names=(), nests=()):
        self.x_names = list(x_names)
        self.alt_names = list(alt_names)
        self.nests: list[Nest] = list(nests)
        self._layouts: dict = {}
        n_alts = len(self.alt_names)
        # each alternative's group key (its nest, or a nest of its own) and lambda parameter (-1: none)
        self.key_of_alt = np.arange(len(self.nests), len(self.nests) + n_alts, dtype=np.int64)
        self.param_of_alt = np.full(n_alts, -1, dtype=np.int64)
        for k, nest in enumerate(self.nests):
            for a in nest.alternatives:
                self.key_of_alt[a] = k
        for j, k in enumerate(self.parameter_nests):
            for a in self.nests[k].alternatives:
                self.param_of_alt[a] = j

    def bind(self, facts, nests=None, **others) -> "NestedLogit":
        if others:
            raise UserError(f"model {self.name} takes no {', '.join(term(k) for k in others)}")
        alt_names = getattr(facts, "alt_names", None)
        if alt_names is None:
            raise UserError(NEEDS_ALT.format(what=getattr(facts, "path", None) or "the file"))
        if nests is None:
            raise UserError(f"model {self.name} needs {term('nests')}: the nests of the alternatives "
                            f"({', '.join(map(str, alt_names))}), e.g. {term('nests')} \"public=train,bus; private=car\"")
        return NestedLogit(facts.x_names, alt_names, parse_nests(nests, alt_names))

    def __getstate__(self):  # the per-tile layouts are rebuilt where the model is used
        state = self.__dict__.copy()
        state["_layouts"] = {}
        return state

    # -- parameters -----------------------------------------------------------------------------------
    @property
    def parameter_nests(self) -> list[int]:
        """The nests with a lambda (at least two alternatives), in the order given."""
        return [k for k, n in enumerate(self.nests) if n.has_parameter]

    def n_params(self, K: int) -> int:
        return K + len(self.parameter_nests)

    def param_names(self, x_names: list[str]) -> list[str]:
        return list(x_names) + [f"log_lambda_{self.nests[k].name}" for k in self.parameter_nests]

    def param_columns(self, K: int) -> list[int | None]:
        return list(range(K)) + [None] * len(self.parameter_nests)

    def derived(self, params: np.ndarray) -> dict[str, float]:
        K = len(params) - len(self.parameter_nests)
        return {f"lambda_{self.nests[k].name}": math.exp(float(params[K + j]))
                for j, k in enumerate(self.parameter_nests)}

    def derived_nulls(self) -> dict[str, float]:
        return {f"lambda_{self.nests[k].name}": 1.0 for k in self.parameter_nests}

    def derived_notes(self, values: dict[str, float]) -> list[str]:
        notes = []
        for name, value in values.items():
            if not name.startswith("lambda_"):
                continue
            if value < BOUNDARY_LAMBDA or value > 1 / BOUNDARY_LAMBDA:
                notes.append(f"{name} = {value:.4g} ran to the boundary, where the moments no longer move with it: "
                             "the instruments do not pin it down on these data (weakly identified); use more sets "
                             "or instruments that move with lambda (x less its mean within the nest, times the nest "
                             "dummy: DESIGN.md, 'Nested logit'), or start nearer (--start)")
            elif value > 1:
                notes.append(f"{name} = {value:.4g} > 1: not consistent with utility maximization for all x (RU2 "
                             "nested logit needs 0 < lambda <= 1; McFadden 1978, Train ch. 4)")
        return notes

    # -- the tile's layout: groups (a nest within a set) and the maps from parameters to lambdas -----
    def layout(self, tile):
        """(groups, N_rows (rows, Pn), N_groups (n_groups, Pn)): the tile's groups and the 0/1 maps
        of rows and groups to their nest's log-lambda parameter; made once per tile."""
        alt = tile.alt
        if alt is None:
            raise UserError(NEEDS_ALT.format(what="the data"))
        cached = self._layouts.get(id(alt))
        if cached is not None and cached[0] is alt and cached[1] is tile.seg:
            return cached[2]
        groups = Groups(tile.seg, self.key_of_alt[alt])
        Pn = len(self.parameter_nests)
        param = self.param_of_alt[alt]
        N_rows = np.zeros((len(alt), Pn))
        has = param >= 0
        N_rows[np.flatnonzero(has), param[has]] = 1.0
        N_rows = np.asfortranarray(N_rows)  # a column per nest, contiguous
        first = groups.runs.starts if groups.order is None else groups.order[groups.runs.starts]
        N_groups = N_rows[first]
        out = (groups, N_rows, N_groups, param, param[first])
        self._layouts[id(alt)] = (alt, tile.seg, out)
        return out

    # -- the reference probabilities (dual operations over groups of rows) ---------------------------
    def _levels(self, theta: Dual, tile):
        groups, N_rows, N_groups, _, _ = self.layout(tile)
        K = tile.X.shape[1]
        V = linear(tile.X, theta[0:K])
        if N_rows.shape[1]:
            W = V * exp(-linear(N_rows, theta[K:]))  # V / lambda, row by row
            lam = exp(linear(N_groups, theta[K:]))  # lambda per group
        else:
            W, lam = V, None
        L = group_logsumexp(W, groups)  # log I per group
        y = L if lam is None else lam * L  # lambda log I
        return groups, W, L, y

    def probabilities(self, theta: Dual, tile) -> Dual:
        groups, W, _, y = self._levels(theta, tile)
        q = group_softmax(W, groups)  # within the nest
        Q = segment_softmax(y, groups.sets)  # of the nest, within the set
        return q * group_broadcast(Q, groups)

    def log_probabilities(self, theta: Dual, tile) -> Dual:
        groups, W, L, y = self._levels(theta, tile)
        upper = y - broadcast(segment_logsumexp(y, groups.sets), groups.sets)
        return W - group_broadcast(L, groups) + group_broadcast(upper, groups)
