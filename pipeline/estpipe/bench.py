"""`estpipe bench`: the kernel's derivative modes against the original plain-numpy evaluation.

Everything is measured in one process and interleaved (f, dual, adjoint, ..., f, dual, ...), so
machine noise hits every row alike; the table reports median times and ratios to f.
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from estpipe.data.format import ChoiceData
from estpipe.kernel.blas import blas_libraries
from estpipe.kernel.engine import PartitionKernel
from estpipe.text import count


@dataclass
class BenchRow:
    name: str
    what: str
    median_ms: float
    ratio: float


@dataclass
class BenchResult:
    sets: int
    alternatives: int
    params: int
    moments: int
    repeat: int
    tile_rows: int
    n_tiles: int
    data_bytes: int
    buffer_bytes: int
    residual_bytes: int
    eval_alloc_peak_bytes: int
    threads: int
    blas: list[dict]
    rows: list[BenchRow] = field(default_factory=list)
    max_rel_error: dict[str, float] = field(default_factory=dict)
    model: str | None = None  # the model of the "dual-model" row (`--model`), or None
    model_strategy: str | None = None  # the kernel strategy it runs on (e.g. generic-dual)
    model_ratio: float | None = None  # dual-model / dual (the fused logit), same run, same threads

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"estpipe bench: {count(self.sets, 'set')} x {self.alternatives} alternatives, K = {self.params}, "
            f"M = {self.moments}; median of {self.repeat} interleaved calls",
            f"{'row':<16} {'median ms':>10} {'x f':>7}  what",
        ]
        lines += [f"{r.name:<16} {r.median_ms:>10.3f} {r.ratio:>7.2f}  {r.what}" for r in self.rows]
        if self.model is not None:
            lines.append(f"model {self.model} ({self.model_strategy}): value + Jacobian {self.model_ratio:.2f}x the fused "
                         "logit's (dual-model / dual)")
        blas = ", ".join(f"{b['internal_api']} {b['version']} ({count(b['num_threads'], 'thread')}, {b['prefix']})" for b in self.blas)
        lines += [
            f"BLAS: {blas or 'none found'}",
            f"data {self.data_bytes / 1e6:.1f} MB; tile buffers {self.buffer_bytes / 1e6:.2f} MB "
            f"({self.n_tiles} tiles of <= {self.tile_rows} rows, {count(self.threads, 'thread')}); adjoint residual "
            f"{self.residual_bytes / 1e6:.2f} MB (8 bytes per row); allocated during one dual evaluation "
            f"(tracemalloc peak) {self.eval_alloc_peak_bytes / 1e3:.1f} kB",
            "max relative error vs the reference: " + ", ".join(f"{k} {v:.1e}" for k, v in self.max_rel_error.items()),
        ]
        return "\n".join(lines)


def seed_design(sets: int, alternatives: int, params: int, moments: int, seed: int = 0) -> tuple[ChoiceData, np.ndarray]:
    """The original report's timing data in memory: X ~ N(0, 1), dm ~ U(0, 1), b ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    rows = sets * alternatives
    X = rng.standard_normal((rows, params))
    dm = rng.uniform(size=(rows, moments))
    offsets = np.arange(0, rows + 1, alternatives, dtype=np.int64)
    return ChoiceData(X=X, dm=dm, offsets=offsets), 0.1 * rng.standard_normal(params)


def plain_objective(b, X, dm, n_sets, alternatives) -> float:
    """The original code's function evaluation in plain numpy: Q = g'g with g = dm' s / n."""
    e = np.exp(X @ b).reshape(n_sets, alternatives)
    s = e / e.sum(axis=1, keepdims=True)
    g = dm.T @ s.ravel() / n_sets
    return float(g @ g)


@dataclass(frozen=True)
class _Facts:
    """What a model binds to, for data made in memory (x1..xK, no alternative ids, no panel)."""

    x_names: list[str]
    alt_names: list[str] | None = None
    has_panel: bool = False


# Options the bench gives the models that need some (its data: x1..xK, alternatives a1..aJ).
def _bench_options(name: str, K: int, J: int) -> dict:
    if name == "mixed-logit":
        return {"random": ",".join(f"x{k + 1}" for k in range(min(3, K)))}
    if name == "nested-logit":
        n_nests = max(1, min(3, J // 2))
        bounds = np.linspace(0, J, n_nests + 1).round().astype(int)
        return {"nests": "; ".join(f"n{i + 1}=" + ",".join(f"a{j + 1}" for j in range(bounds[i], bounds[i + 1]))
                                   for i in range(n_nests))}
    return {}


def bench_model(name: str, K: int, J: int = 0):
    """The model `name` (a registry name, path.py:Class or an installed model) bound to K
    covariates x1..xK and J alternatives a1..aJ, as estimate would build it; the mixed logit with
    random coefficients on x1..x3 (200 draws), the nested logit with up to 3 contiguous nests."""
    from estpipe.models.spec import ModelSpec

    facts = _Facts([f"x{k + 1}" for k in range(K)], [f"a{j + 1}" for j in range(J)] if J else None)
    return ModelSpec.of(name, **_bench_options(name, K, J)).build(facts)


def run_bench(sets=1000, alternatives=30, params=20, moments=40, repeat=30, tile_rows=None, seed=0,
              threads=None, model: str | None = None) -> BenchResult:
    """model: also time value + Jacobian of this model (row "dual-model") on the kernel strategy
    estimate would pick for it, at b when it has K parameters (a logit written as a user's file:
    the generic path against the fused logit), else at its start."""
    data, b = seed_design(sets, alternatives, params, moments, seed)
    X, dm, n = data.X, data.dm, sets
    W = np.eye(moments)
    kernels = {mode: PartitionKernel(data, derivatives=mode, tile_rows=tile_rows, threads=threads)
               for mode in ("dual", "adjoint", "fd")}
    generic = PartitionKernel(data, derivatives="dual", tile_rows=tile_rows, fast=False, threads=threads)
    if model is not None:
        chosen = bench_model(model, params, alternatives)
        if "alt" in chosen.needs:  # every set holds alternatives a1..aJ in order
            data = replace(data, alt=np.tile(np.arange(alternatives, dtype=np.int32), sets))
        user = PartitionKernel(data, model=chosen, derivatives="dual", tile_rows=tile_rows, threads=threads)
        user_params = b if user.n_params == params else np.asarray(chosen.start(params), dtype=np.float64)

    def value_and_gradient():
        g = kernels["adjoint"].sums(b, jacobian=False).g
        return g @ W @ g, (2.0 / n) * kernels["adjoint"].pullback(b, W @ g)

    def fd_plain():
        base = plain_objective(b, X, dm, n, alternatives)
        for k in range(params):
            step = b.copy()
            step[k] += 1.4901161193847656e-08
            plain_objective(step, X, dm, n, alternatives)
        return base

    # The dual block's GEMM on its own, over all rows with preallocated block and output: the
    # floor under any dual-block evaluation, so the table shows how much the rest costs.
    reference_block = np.column_stack([np.full(len(X), 1.0 / alternatives), X])
    gemm_out = np.empty((moments, 1 + params))

    calls = {
        "f": ("plain numpy Q(b): X @ b, exp, per-set normalization, dm' s / n, g'g",
              lambda: plain_objective(b, X, dm, n, alternatives)),
        "value": ("kernel moments g alone (tiled, fast logit)", lambda: kernels["dual"].sums(b, jacobian=False)),
        "dual": ("value + full Jacobian G, dual blocks (fast logit path)", lambda: kernels["dual"].sums(b)),
        "gemm": ("dm' @ [s | ds/db] alone: the one BLAS product every dual evaluation needs",
                 lambda: np.dot(dm.T, reference_block, out=gemm_out)),
        "dual-single": ("the same, Jacobian's GEMM in float32 (search directions only)",
                        lambda: kernels["dual"].sums(b, precision="single")),
        "dual-generic": ("value + full Jacobian G, generic dual path (any model)", lambda: generic.sums(b)),
        **({"dual-model": (f"value + full Jacobian G of model {model} ({user.strategy.name} kernel)",
                           lambda: user.sums(user_params))} if model is not None else {}),
        "adjoint": ("value + gradient of Q, reverse mode (sums + pullback)", value_and_gradient),
        "fd": ("value + Jacobian by one-sided finite differences (P + 1 kernel values)", lambda: kernels["fd"].sums(b)),
        "fd-numpy": ("finite differences of f (P + 1 evaluations of f)", fd_plain),
    }
    for _, fn in calls.values():  # warm-up: the first call allocates the tile buffers
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, (_, fn) in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["f"]))
    rows = [BenchRow(name, what, 1e3 * float(np.median(times[name])), float(np.median(times[name])) / base)
            for name, (what, _) in calls.items()]

    tracemalloc.start()
    kernels["dual"].sums(b)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    from estpipe.kernel.reference import logit_sums_reference

    ref = logit_sums_reference(b, X, dm, data.offsets, covariance=False)
    scale = np.abs(ref.gG).max()
    grad_ref = 2.0 * ref.G.T @ W @ ref.g
    errors = {
        "dual": float(np.abs(kernels["dual"].sums(b).gG - ref.gG).max() / scale),
        "dual-single": float(np.abs(kernels["dual"].sums(b, precision="single").gG - ref.gG).max() / scale),
        "dual-generic": float(np.abs(generic.sums(b).gG - ref.gG).max() / scale),
        "adjoint": float(np.abs(value_and_gradient()[1] - grad_ref).max() / np.abs(grad_ref).max()),
        "fd": float(np.abs(kernels["fd"].sums(b).gG - ref.gG).max() / scale),
    }
    if model is not None and user.n_params == params:
        # against the logit's sums: a measure of error only for a model that is the logit
        errors["dual-model-vs-logit"] = float(np.abs(user.sums(user_params).gG - ref.gG).max() / scale)
    medians = {r.name: r.median_ms for r in rows}
    k = kernels["dual"]
    return BenchResult(
        sets=sets, alternatives=alternatives, params=params, moments=moments, repeat=repeat,
        tile_rows=max(t.row_stop - t.row_start for t in k.tiles), n_tiles=k.n_tiles,
        data_bytes=data.nbytes, buffer_bytes=k.buffer_nbytes, residual_bytes=kernels["adjoint"].residual_nbytes,
        eval_alloc_peak_bytes=int(peak), threads=k.threads,
        blas=blas_libraries(), rows=rows, max_rel_error=errors, model=model,
        model_strategy=None if model is None else user.strategy.name,
        model_ratio=None if model is None else medians["dual-model"] / medians["dual"],
    )
