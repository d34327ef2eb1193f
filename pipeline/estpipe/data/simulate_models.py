"""The simulate designs of the models beyond the logit: "mixed-logit" and "nested-logit".

Each design draws its data from exactly the model estpipe estimates under that name, and stores
the true parameters in that model's parameter order with their names (truth, truth_names), each
row's alternative ("a1".."aJ") and, for the mixed logit with `panel_size`, each set's decision
maker. Both share the logit design's covariates, X ~ N(0, 1), and its coefficients b (K,), drawn
from the seeded generator and scaled so that x'b has standard deviation TRUTH_UTILITY_SD.

mixed-logit (models/mixed_logit.py): random columns R (`random`: "x1,x2", "x2:-lognormal", or a
count n for x1..xn), a Cholesky factor L (Kr, Kr): diagonal sds in (0.5, 1.0) (lognormal:
(0.3, 0.6)), with `correlated` also off-diagonal entries in (-0.4, 0.4). Per decision maker i
(a run of `panel_size` sets; each set its own when None) eta_i ~ N(0, I_Kr) and
beta_ir = g_r(b_r + (L eta_i)_r), g the identity (normal) or sign * exp (lognormal; b_r the
log-scale mean, log|b_r| of the logit's draw), so u_ij = sum_fixed x_ijk b_k + sum_r x_ijr beta_ir
and the choice is drawn from the logit probabilities given beta_i. The instruments are x, the
squares less one of the random x, their pairwise products, then (for larger M) the logit
design's other instruments: the squares and products identify the variances and covariances.

nested-logit (RU2; Train ch. 4, Koppelman and Wen 1998): J = the largest set size alternatives
"a1".."aJ", split into `nests` contiguous nests "n1".."nN" of sizes as equal as possible (the
last ones one larger). A set of size s < J holds s of the J alternatives, drawn at random (sets of
fixed size J hold all). With V_j = x_j'b and lambda_k in (0.3, 0.9) per nest of >= 2
alternatives (a nest of one has lambda 1, no parameter),
    P_j = exp(V_j / l_k) I_k^(l_k - 1) / sum_m I_m^(l_m),   I_k = sum_{i in k, in the set} exp(V_i / l_k).
Parameters: b, then log_lambda_<nest> for each nest with a parameter. The instruments are x,
then x interacted with the nest dummies of the nests with a parameter (x_1 d_n1, x_1 d_n2, ...,
x_2 d_n1, ...: they identify lambda; the last nest's left out when every alternative is in one,
as then the dummies sum to 1 and x is the sum of its interactions), then the squares less one of x.

Reproducibility: as the logit design, one generator per random quantity consumed in set order
(sizes, X, the alternatives present, one row of eta per decision maker, one uniform per choice),
so the same seed gives the same arrays whatever the chunk size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from estpipe.errors import UserError, term


def alternative_names(J: int) -> list[str]:
    return [f"a{j + 1}" for j in range(J)]


def nest_sizes(J: int, N: int) -> list[int]:
    """N contiguous nests of J alternatives, sizes as equal as possible, the last ones larger."""
    base, extra = divmod(J, N)
    return [base + (1 if k >= N - extra else 0) for k in range(N)]


def nests_text(J: int, N: int) -> str:
    """"n1=a1,a2,a3; n2=a4,a5,a6; n3=a7,a8,a9,a10" for J = 10, N = 3 (what --nests takes)."""
    names, out, j = alternative_names(J), [], 0
    for k, size in enumerate(nest_sizes(J, N)):
        out.append(f"n{k + 1}=" + ",".join(names[j : j + size]))
        j += size
    return "; ".join(out)


def nested_logit_log_probabilities(V: np.ndarray, nest: np.ndarray, lam: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """log P_j of the RU2 nested logit for sets of `sizes` (n,) rows.

    V: (rows,) utilities; nest: (rows,) the nest index of each row's alternative (0..N-1); lam:
    (N,) the nests' lambdas (1 for a nest of one). Computed in logs, per (set, nest) group:
    log I_k = logsumexp_{i in k}(V_i / l_k), log P_j = V_j / l_k + (l_k - 1) log I_k
    - logsumexp_m(l_m log I_m)."""
    n, N = len(sizes), len(lam)
    set_of_row = np.repeat(np.arange(n), sizes)
    scaled = V / lam[nest]
    group = set_of_row * N + nest  # (rows,) the (set, nest) of each row
    top = np.full(n * N, -np.inf)
    np.maximum.at(top, group, scaled)
    inner = np.zeros(n * N)
    np.add.at(inner, group, np.exp(scaled - top[group]))
    with np.errstate(divide="ignore"):
        log_I = np.log(inner) + top  # -inf for (set, nest) groups with no alternative
    weighted = (lam[None, :] * log_I.reshape(n, N))  # (n, N) l_m log I_m
    peak = weighted.max(axis=1)
    log_denom = peak + np.log(np.exp(weighted - peak[:, None]).sum(axis=1))
    return scaled + (lam[nest] - 1.0) * log_I[group] - log_denom[set_of_row]


def draw_positions(log_p: np.ndarray, sizes: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Position (0-based, in its set) of the chosen row of each set: the first whose cumulative
    probability exceeds u times the set's total. log_p: (rows,); uniforms: (n,) in [0, 1)."""
    n, hi = len(sizes), int(sizes.max())
    w = np.zeros((n, hi))
    w[np.arange(hi)[None, :] < sizes[:, None]] = np.exp(log_p)
    np.cumsum(w, axis=1, out=w)
    pick = np.argmax(w > uniforms[:, None] * w[:, -1:], axis=1)
    return np.minimum(pick, sizes - 1)


@dataclass
class DesignChunk:
    """Whole sets: X (rows, K), dm (rows, M), sizes (n,), chosen (rows,) int8, alt (rows,)
    int32, panel (n,) int64 or None."""

    X: np.ndarray
    dm: np.ndarray
    sizes: np.ndarray
    chosen: np.ndarray
    alt: np.ndarray
    panel: np.ndarray | None


class ModelDesign:
    """What a model design adds to the shared draws: its truth, instruments and choices."""

    name = ""
    panel_size: int | None = None

    def __init__(self, K: int, M: int, lo: int, hi: int, b: np.ndarray):
        self.K, self.M, self.lo, self.hi, self.b = K, M, lo, hi, b
        self.x_names = [f"x{k + 1}" for k in range(K)]

    # instruments: (name, function of X (rows, K) -> (rows,) and of the alternatives (rows,))
    def instrument_terms(self) -> list:
        raise NotImplementedError

    def moment_terms(self) -> list:
        terms = self.instrument_terms()
        if self.M > len(terms):
            raise UserError(
                f"{term('moments')} {self.M} is too many for the {self.name} design with {term('params')} {self.K}: it builds "
                f"at most {len(terms)} instruments; use {term('moments')} {len(terms)} or fewer")
        return terms[: self.M]

    def moment_names(self) -> list[str]:
        return [name for name, _ in self.moment_terms()]

    def instruments(self, X: np.ndarray, alt: np.ndarray) -> np.ndarray:
        return np.column_stack([f(X, alt) for _, f in self.moment_terms()])

    def alternatives(self) -> list[str]:
        return alternative_names(self.hi)


def _square(k):
    return lambda X, alt: X[:, k] * X[:, k] - 1.0


def _product(a, b):
    return lambda X, alt: X[:, a] * X[:, b]


def _column(k):
    return lambda X, alt: X[:, k]


class MixedLogitDesign(ModelDesign):
    name = "mixed-logit"

    def __init__(self, K, M, lo, hi, b, rng, random, correlated, panel_size):
        super().__init__(K, M, lo, hi, b)
        from estpipe.models.mixed_logit import parse_random

        if random is None:
            random = 1
        if isinstance(random, int) or (isinstance(random, str) and random.strip().isdigit()):
            n = int(random)
            if not 1 <= n <= K:
                raise UserError(f"{term('random')} {n}: give between 1 and {term('params')} ({K}) random columns, or their names")
            random = ",".join(self.x_names[:n])
        self.random = parse_random(random, self.x_names)
        self.random_text = ",".join(r.name + {0: "", 1: ":lognormal", -1: ":-lognormal"}[r.sign] for r in self.random)
        self.correlated = bool(correlated)
        self.panel_size = int(panel_size) if panel_size is not None else None
        Kr = len(self.random)
        L = np.zeros((Kr, Kr))
        for i, r in enumerate(self.random):
            low, high = (0.3, 0.6) if r.sign else (0.8, 1.2)
            L[i, i] = rng.uniform(low, high)
            if self.correlated:
                L[i, :i] = rng.uniform(-0.4, 0.4, i)
        self.L = L
        self.mean = b.copy()  # b_k, or for a lognormal column the log-scale mean
        for r in self.random:
            if r.sign:
                self.mean[r.column] = math.log(max(abs(b[r.column]), 0.3))
        self.model = self._model()

    def _model(self):
        from estpipe.models import get_model

        class Facts:
            x_names, alt_names, has_panel = self.x_names, None, self.panel_size is not None

        return get_model("mixed-logit").bind(Facts, random=self.random_text, correlated=self.correlated)

    def truth(self) -> tuple[np.ndarray, list[str]]:
        """The true parameters in the model's order: per x its b (the log-scale mean of a
        lognormal), then the sds (or the Cholesky entries row by row)."""
        spread = [self.L[i, l] for i, l in self.model._spread_pairs()]
        return np.r_[self.mean, spread], self.model.param_names(self.x_names)

    def instrument_terms(self) -> list:
        K, rc = self.K, [r.column for r in self.random]
        names = self.x_names
        terms = [(names[k], _column(k)) for k in range(K)]
        terms += [(f"{names[k]}^2-1", _square(k)) for k in rc]
        pairs = [(a, b) for i, a in enumerate(rc) for b in rc[i + 1 :]]
        terms += [(f"{names[min(a, b)]}*{names[max(a, b)]}", _product(min(a, b), max(a, b))) for a, b in pairs]
        used = {n for n, _ in terms}
        terms += [(f"{names[k]}^2-1", _square(k)) for k in range(K) if f"{names[k]}^2-1" not in used]
        terms += [(f"{names[a]}*{names[b]}", _product(a, b)) for a in range(K) for b in range(a + 1, K)
                  if f"{names[a]}*{names[b]}" not in used]
        return terms

    def coefficients(self, eta: np.ndarray) -> np.ndarray:
        """beta (n_units, K) per decision maker from eta (n_units, Kr)."""
        beta = np.repeat(self.mean[None, :], len(eta), axis=0)
        z = self.mean[[r.column for r in self.random]][None, :] + eta @ self.L.T
        for i, r in enumerate(self.random):
            beta[:, r.column] = r.sign * np.exp(z[:, i]) if r.sign else z[:, i]
        return beta

    def log_probabilities(self, X, sizes, beta_rows) -> np.ndarray:
        u = np.einsum("rk,rk->r", X, beta_rows)
        set_of_row = np.repeat(np.arange(len(sizes)), sizes)
        top = np.full(len(sizes), -np.inf)
        np.maximum.at(top, set_of_row, u)
        w = np.exp(u - top[set_of_row])
        total = np.bincount(set_of_row, weights=w, minlength=len(sizes))
        return u - top[set_of_row] - np.log(total)[set_of_row]


class NestedLogitDesign(ModelDesign):
    name = "nested-logit"

    def __init__(self, K, M, lo, hi, b, rng, nests):
        super().__init__(K, M, lo, hi, b)
        N = 2 if nests is None else int(nests)
        if not 1 <= N <= hi:
            raise UserError(f"{term('nests')} {N}: give between 1 and {hi} nests (the number of alternatives, the largest "
                            f"set size of {term('alternatives')})")
        self.N = N
        self.sizes = nest_sizes(hi, N)
        self.nest_of_alt = np.repeat(np.arange(N), self.sizes)  # (J,)
        self.with_param = [k for k in range(N) if self.sizes[k] >= 2]
        self.lam = np.ones(N)
        for k in self.with_param:
            self.lam[k] = rng.uniform(0.3, 0.9)
        self.nests = nests_text(hi, N)

    def truth(self) -> tuple[np.ndarray, list[str]]:
        names = self.x_names + [f"log_lambda_n{k + 1}" for k in self.with_param]
        return np.r_[self.b, np.log(self.lam[self.with_param])], names

    def instrument_terms(self) -> list:
        K, names = self.K, self.x_names
        terms = [(names[k], _column(k)) for k in range(K)]
        # when every alternative is in a nest with a parameter, the nest dummies sum to 1 and x is
        # the sum of its interactions: the last nest's would make the moments collinear (S singular)
        interacted = self.with_param[:-1] if len(self.with_param) == self.N else self.with_param
        for k in range(K):
            for n in interacted:
                terms.append((f"{names[k]}*d_n{n + 1}", self._in_nest(k, n)))
        terms += [(f"{names[k]}^2-1", _square(k)) for k in range(K)]
        return terms

    def _in_nest(self, k, n):
        nest_of_alt = self.nest_of_alt
        return lambda X, alt: X[:, k] * (nest_of_alt[alt] == n)

    def log_probabilities(self, X, sizes, alt) -> np.ndarray:
        return nested_logit_log_probabilities(X @ self.b, self.nest_of_alt[alt], self.lam, sizes)


def check_design_options(design, cluster_size, random, correlated, panel_size, nests) -> None:
    """The options of one design refused for the others, in one line each."""
    if design != "mixed-logit":
        for name, value in (("random", random), ("correlated", correlated or None), ("panel_size", panel_size)):
            if value is not None:
                raise UserError(f"{term(name)} is for {term('design')} mixed-logit (random coefficients per decision maker), "
                                f"not {design}")
    if design != "nested-logit" and nests is not None:
        raise UserError(f"{term('nests')} is for {term('design')} nested-logit, not {design}")
    if design in ("mixed-logit", "nested-logit") and cluster_size is not None:
        raise UserError(f"{term('cluster_size')} is for the logit design (a shock per cluster); the {design} design has "
                        + ("decision makers instead: use " + term("panel_size") if design == "mixed-logit" else "no clusters"))
    if panel_size is not None and int(panel_size) < 1:
        raise UserError(f"{term('panel_size')} {panel_size}: a decision maker needs at least 1 set")


def simulate_chunks(design: ModelDesign, streams: dict, sets: int, chunk_sets: int):
    """(s0, DesignChunk) for sets s0.. in set order, chunks of whole decision makers."""
    lo, hi, K = design.lo, design.hi, design.K
    ps = design.panel_size
    if ps:
        chunk_sets = max(ps, chunk_sets - chunk_sets % ps)
    J = hi
    for s0 in range(0, sets, chunk_sets):
        n = min(chunk_sets, sets - s0)
        if lo == hi:
            sizes = np.full(n, lo, dtype=np.int64)
        else:
            sizes = lo + (streams["sizes"].random(n) * (hi - lo + 1)).astype(np.int64)
        rows = int(sizes.sum())
        X = streams["X"].standard_normal((rows, K))
        starts = np.cumsum(sizes) - sizes
        position = np.arange(rows) - np.repeat(starts, sizes)
        if isinstance(design, NestedLogitDesign) and lo != hi:
            # s of the J alternatives, at random: those of the s smallest of J uniforms, in order
            u = streams["alternatives"].random((n, J))
            rank = np.argsort(np.argsort(u, axis=1), axis=1)
            alt = np.nonzero(rank < sizes[:, None])[1].astype(np.int32)
        else:
            alt = position.astype(np.int32)
        panel = None
        if isinstance(design, MixedLogitDesign):
            unit_of_set = np.arange(s0, s0 + n, dtype=np.int64) // ps if ps else np.arange(s0, s0 + n, dtype=np.int64)
            first = int(unit_of_set[0])
            eta = streams["coefficients"].standard_normal((int(unit_of_set[-1]) + 1 - first, len(design.random)))
            beta = design.coefficients(eta)[np.repeat(unit_of_set - first, sizes)]
            log_p = design.log_probabilities(X, sizes, beta)
            panel = unit_of_set if ps else None
        else:
            log_p = design.log_probabilities(X, sizes, alt)
        pick = draw_positions(log_p, sizes, streams["choice"].random(n))
        chosen = np.zeros(rows, dtype=np.int8)
        chosen[starts + pick] = 1
        Z = design.instruments(X, alt)
        dm = Z - np.repeat(Z[starts + pick], sizes, axis=0)
        yield s0, DesignChunk(X=X, dm=dm, sizes=sizes, chosen=chosen, alt=alt, panel=panel)
