"""The mixed logit: coefficients that vary across decision makers (DESIGN.md, "Mixed logit").

    u_ij = sum_{k fixed} x_ijk b_k + sum_{k random} x_ijk beta_ik,   beta_i = g(b + L eta_i)

with eta_i ~ N(0, I) per decision maker (a panel unit, or a set when the file has none), L
diagonal (the sds) or, with `correlated`, a lower-triangular Cholesky factor, and g the identity
(normal) or +-exp (a lognormal coefficient of fixed sign, `cost:-lognormal`). The simulated
probability of alternative j in set i is the mean over the unit's R draws of the logit
probabilities, sbar_ij = (1/R) sum_r s_ijr. It is linear in the simulated probabilities, so the
moments h_i = sum_j sbar_ij dm_ij have E[g] = 0 at the truth for any R (the method of simulated
moments; McFadden 1989, Pakes and Pollard 1989, Train ch. 10).

Parameters, in order: for each column of X, its coefficient ("x" when fixed, "b_x" the mean of
a random one); then for each random column in the order given, "sd_x" (with `correlated`, the
Cholesky entries row by row, "chol_xi_xj" for i >= j). sd = 0 is a stationary boundary (the sd
columns of the moment Jacobian vanish there), so the default start has every sd at 0.5; a sd and
-sd give the same model, so results report |sd| (and Cholesky columns with positive diagonal).

`probabilities` here is the reference, written with the dual operations over an expanded
(draw, row) axis; the kernel's fused strategy (kernel/fused_mixed.py) computes the same sums
with the draws summed by matrix products, and is tested equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from estpipe.dual import Dual, Segments, exp, linear, repeat_draws, segment_softmax, sum_draws
from estpipe.errors import UserError, term
from estpipe.models.base import Model
from estpipe.models.draws import DRAW_KINDS, Draws

DEFAULT_DRAWS = 200
# Bytes of draws a model (one per kernel, i.e. per partition) keeps between evaluations.
DRAW_CACHE_BYTES = 256 * 2**20
START_SD = 0.5


@dataclass(frozen=True)
class RandomCoefficient:
    column: int  # the column of X
    name: str
    sign: int  # 0: normal; +1 / -1: lognormal of that sign


def parse_random(text: str, x_names: list[str]) -> list[RandomCoefficient]:
    """'time,cost:-lognormal' -> the random coefficients, refusing unknown columns and kinds."""
    out: list[RandomCoefficient] = []
    for word in [w.strip() for w in str(text).split(",") if w.strip()]:
        name, _, kind = word.partition(":")
        name, kind = name.strip(), kind.strip().lower()
        if name not in x_names:
            raise UserError(f"{term('random')}: {name!r} is not a column of x; the x columns are: {', '.join(x_names)}")
        signs = {"": 0, "normal": 0, "lognormal": 1, "+lognormal": 1, "-lognormal": -1}
        if kind not in signs:
            raise UserError(f"{term('random')}: {word!r}: the distribution {kind!r} is not normal, lognormal or "
                            "-lognormal (a lognormal with a fixed sign)")
        if any(r.name == name for r in out):
            raise UserError(f"{term('random')}: {name} is named twice; name each random column once")
        out.append(RandomCoefficient(x_names.index(name), name, signs[kind]))
    if not out:
        raise UserError(f"{term('random')} names no column; give the random coefficients, e.g. {term('random')} time,cost")
    return out


class MixedLogit(Model):
    name = "mixed-logit"
    description = "random coefficients (normal or lognormal, optionally correlated) by simulated moments or likelihood"
    simulated = True

    def __init__(self, x_names=(), random=(), correlated=False, draws=None, by_unit=True):
        self.x_names = list(x_names)
        self.random: list[RandomCoefficient] = list(random)
        self.correlated = bool(correlated)
        self.draws: Draws | None = draws
        self.by_unit = by_unit

    def bind(self, facts, random=None, correlated=False, draws=None, draws_kind=None, draws_seed=None,
             panel=None, **others) -> "MixedLogit":
        if others:
            raise UserError(f"model {self.name} takes no {', '.join(term(k) for k in others)}")
        if random is None:
            raise UserError(f"model {self.name} needs {term('random')}: the x columns with random coefficients, "
                            f"e.g. {term('random')} time,cost:-lognormal")
        x_names = list(facts.x_names)
        coefficients = parse_random(random, x_names)
        R = DEFAULT_DRAWS if draws is None else draws
        if not (isinstance(R, int) and not isinstance(R, bool) and R >= 1):
            raise UserError(f"{term('draws')} must be a whole number of draws >= 1, got {R!r}")
        kind = "sobol" if draws_kind is None else draws_kind
        problem = DRAW_KINDS.problem(kind)
        if problem is not None:
            raise UserError(f"{term('draws_kind')}: {problem}")
        if panel and not facts.has_panel:
            raise UserError(f"{term('panel')}: draws per decision maker need the file's panel units, and this file has "
                            "none; load it with `estpipe load --panel-col COLUMN` (the decision maker's id)")
        seed = 0 if draws_seed is None else int(draws_seed)
        return MixedLogit(x_names, coefficients, correlated,
                          Draws(kind=kind, R=int(R), dims=len(coefficients), seed=seed), by_unit=True)

    # -- parameters -----------------------------------------------------------------------------------
    @property
    def Kr(self) -> int:
        return len(self.random)

    def _spread_pairs(self) -> list[tuple[int, int]]:
        """(i, l) of the spread parameters: the diagonal (sds), or the lower triangle row by row."""
        if self.correlated:
            return [(i, l) for i in range(self.Kr) for l in range(i + 1)]
        return [(i, i) for i in range(self.Kr)]

    def n_params(self, K: int) -> int:
        return K + len(self._spread_pairs())

    def param_names(self, x_names: list[str]) -> list[str]:
        rand = {r.column: r for r in self.random}
        names = [f"b_{n}" if k in rand else n for k, n in enumerate(x_names)]
        for i, l in self._spread_pairs():
            ri, rl = self.random[i], self.random[l]
            names.append(f"chol_{ri.name}_{rl.name}" if self.correlated else f"sd_{ri.name}")
        return names

    def param_columns(self, K: int) -> list[int | None]:
        cols: list[int | None] = list(range(K))
        for r in self.random:
            if r.sign:
                cols[r.column] = None  # a lognormal's b is on the log scale
        for i, _ in self._spread_pairs():
            cols.append(None if self.random[i].sign else self.random[i].column)
        return cols

    def start(self, K: int) -> np.ndarray:
        out = np.zeros(self.n_params(K))
        for j, (i, l) in enumerate(self._spread_pairs()):
            out[K + j] = START_SD if i == l else 0.0
        return out

    def canonical_signs(self, params: np.ndarray) -> np.ndarray:
        """+-1 per parameter: a spread column and its negative give the same model (eta is
        symmetric), so the results report sds >= 0 (Cholesky columns with a positive diagonal)."""
        K = len(self.x_names)
        signs = np.ones(len(params))
        pairs = self._spread_pairs()
        column_sign = {l: (1.0 if params[K + pairs.index((l, l))] >= 0 else -1.0) for l in range(self.Kr)}
        for j, (_, l) in enumerate(pairs):
            signs[K + j] = column_sign[l]
        return signs

    def _cholesky(self, params: np.ndarray) -> np.ndarray:
        K = len(self.x_names)
        L = np.zeros((self.Kr, self.Kr))
        for j, (i, l) in enumerate(self._spread_pairs()):
            L[i, l] = params[K + j]
        return L

    def derived(self, params: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        L = self._cholesky(params)
        cov = L @ L.T
        for i, r in enumerate(self.random):
            if r.sign:
                b, var = params[r.column], cov[i, i]
                mean = r.sign * math.exp(b + var / 2)
                out[f"mean_{r.name}"] = mean
                out[f"median_{r.name}"] = r.sign * math.exp(b)
                out[f"sd_of_{r.name}"] = abs(mean) * math.sqrt(max(math.expm1(var), 0.0))
        if self.correlated:
            for i in range(self.Kr):
                for l in range(i + 1):
                    out[f"cov_{self.random[i].name}_{self.random[l].name}"] = float(cov[i, l])
        return out

    def unit_draws(self, units: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """(n, Kr, r1 - r0) the units' normal draws r0:r1, draws last (the layout of the simulated
        likelihood's products), kept while the kernel's cache holds at most DRAW_CACHE_BYTES: an
        estimation evaluates the same draws some 50 times, and making them is a fifth of an
        evaluation (measured at 4,000 x 3, 1,000 draws). Beyond the budget they are made anew
        each time, and memory stays independent of R."""
        key = (int(units[0]), int(units[-1]), len(units), r0, r1) if len(units) else (0, 0, 0, r0, r1)
        cache = self.__dict__.setdefault("_unit_draws", {})
        hit = cache.get(key)
        if hit is not None:
            return hit
        out = np.ascontiguousarray(self.draws.normals(units, r0, r1).transpose(0, 2, 1))
        used = self.__dict__.get("_unit_draws_bytes", 0)
        if used + out.nbytes <= DRAW_CACHE_BYTES:
            cache[key] = out
            self.__dict__["_unit_draws_bytes"] = used + out.nbytes
        return out

    def __getstate__(self):  # caches stay with their process
        return {k: v for k, v in self.__dict__.items() if k not in ("_unit_draws", "_unit_draws_bytes", "_mean_draws")}

    def mean_draws(self, units: np.ndarray) -> np.ndarray:
        """(n, Kr) each unit's mean of its R normal draws (the model at spread 0 needs only
        these), memoized for the last few tiles' units: a logit start evaluates them repeatedly."""
        key = (int(units[0]), int(units[-1]), len(units)) if len(units) else (0, 0, 0)
        cache = self.__dict__.setdefault("_mean_draws", {})
        if key not in cache:
            R, step = self.draws.R, max(1, (1 << 20) // max(1, len(units) * self.Kr))
            total = np.zeros((len(units), self.Kr))
            for r0 in range(0, R, step):
                total += self.draws.normals(units, r0, min(R, r0 + step)).sum(axis=1)
            if len(cache) > 4096:
                cache.clear()
            cache[key] = total / R
        return cache[key]

    # -- the reference probabilities (dual operations over a (draw, row) axis) ------------------------
    def draw_batch(self, rows: int) -> int:
        """Draws per batch for a tile of `rows` rows: the batch, not R, bounds the memory."""
        return max(1, min(self.draws.R, (1 << 16) // max(rows, 1)))

    def probabilities(self, theta: Dual, tile) -> Dual:
        seg: Segments = tile.seg
        rows, K = tile.X.shape
        R = self.draws.R
        units, inverse = np.unique(tile.unit, return_inverse=True)
        set_of_row = np.repeat(np.arange(seg.n_sets), seg.sizes)
        random_cols = [r.column for r in self.random]
        fixed = np.zeros((rows, theta.rows))
        fixed_cols = [k for k in range(K) if k not in random_cols]
        fixed[:, fixed_cols] = tile.X[:, fixed_cols]
        u_fixed = linear(fixed, theta)
        pairs = self._spread_pairs()
        step = self.draw_batch(rows)
        total = None
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            B = r1 - r0
            eta = self.draws.normals(units, r0, r1)[inverse]  # (n_sets, B, Kr)
            u = repeat_draws(u_fixed, B)  # the (draw, row) axis, draw-major
            row_in_draw = (np.arange(B)[:, None] * seg.n_sets + set_of_row[None, :]).ravel()
            for i, rc in enumerate(self.random):
                # z_i(draw, set) = b_i + sum_l L_il eta_l: a linear map of theta, draw-major
                Z = np.zeros((B * seg.n_sets, theta.rows))
                Z[:, rc.column] = 1.0
                for j, (a, l) in enumerate(pairs):
                    if a == i:
                        Z[:, K + j] = eta[:, :, l].T.ravel()
                z = linear(Z, theta)
                beta = exp(z) * float(rc.sign) if rc.sign else z
                u = u + beta[row_in_draw] * np.tile(tile.X[:, rc.column], B)
            expanded = Segments(np.concatenate([seg.offsets[:-1] + b * rows for b in range(B)] + [[B * rows]]))
            part = sum_draws(segment_softmax(u, expanded), B)
            total = part if total is None else total + part
        return total * (1.0 / R)
