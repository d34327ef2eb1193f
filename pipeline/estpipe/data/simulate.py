"""Simulated choice data, streamed to a choice-data file (DESIGN.md, `estpipe simulate`).

Designs
- "logit" (the default): X ~ N(0,1) with K columns; true parameters b drawn from the seeded
  generator and scaled so that the utilities u = X b have standard deviation TRUTH_UTILITY_SD; one
  choice per set drawn from the logit probabilities softmax(u) within the set; instruments z = the
  K columns of x, then further mean-zero functions of x (see `moment_names`) up to M columns;
  dm = z - z_chosen per set. Estimates must recover `truth/params`.
- "seed": the original report's benchmark data: X ~ N(0,1), dm ~ U(0,1). For timing only: with
  dm > 0 the moments are never zero, so its GMM problem has no finite minimizer. No truth, no
  chosen rows.

Clusters (`cluster_size=C`): sets are grouped into contiguous clusters of C sets (the last one may
be shorter), ids 0, 1, ... In the logit design every cluster c also draws a shock to the
coefficients, eta_c ~ N(0, (CLUSTER_SHOCK_SD^2 / K) I_K), so the utilities of its rows are
u_ij = x_ij' (b + eta_c): a utility shock x_ij' eta_c with standard deviation CLUSTER_SHOCK_SD,
common to the cluster. The moments h_i of one cluster are then correlated (they all move with
eta_c), so the clustered moment covariance is larger than the plain one. A shock per
alternative position would not do that: positions are exchangeable and unrelated to the
instruments. The data then follow a logit with random coefficients, not the plain logit, so the
pooled estimates of b are attenuated: by about 1 - sqrt((pi^2/6) / (pi^2/6 + CLUSTER_SHOCK_SD^2)),
7% at the default (measured 6-9% with K = 3, 40,000 sets in clusters of 40). Without
clusters there is no shock and estimates recover truth/params.

Reproducibility: every random quantity comes from its own generator, spawned from
SeedSequence(seed) and consumed strictly in set order (one draw per set for sizes and choices,
row-major for X and dm, one row of shocks per cluster). numpy's `random` and `standard_normal`
consume a generator identically whether they fill one array or several pieces of it, so the same
seed gives byte-equal arrays whatever the chunk size.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from estpipe import outputs
from estpipe.data.format import DEFAULT_CHUNK_ROWS, MAX_COLUMNS, ChoiceDataWriter, estimated_file_bytes, provenance
from estpipe.errors import UserError, term
from estpipe.registry import Choice, Registry, did_you_mean
from estpipe.text import count

DESIGNS: Registry[Choice] = Registry("design", [
    Choice("logit", "choices from a true logit model"),
    Choice("seed", "timing data, no estimate"),
    Choice("mixed-logit", "random coefficients per decision maker (--random, --correlated, --panel-size)"),
    Choice("nested-logit", "an RU2 nested logit of --nests contiguous nests of the alternatives"),
])
TRUTH_UTILITY_SD = 1.5
CLUSTER_SHOCK_SD = 0.5
# Rows per chunk of sets when the caller does not say: four HDF5 row chunks, large enough that
# per-chunk overhead vanishes, small enough that the buffers stay a few tens of MB.
TARGET_CHUNK_ROWS = 4 * DEFAULT_CHUNK_ROWS
# ... and fewer rows for very wide data: one buffer set (X, dm and the gathered chosen instruments)
# stays within this many bytes (the default sizes are well below it).
TARGET_CHUNK_BYTES = 64 * 2**20
# Rows are counted in int64 (offsets): more than this many cannot be written.
MAX_ROWS = 2**62
# Draw the next chunk's random numbers in a thread while this one is finished and written
# (measured 25-35% less wall time at 100,000 x 30 on 2 cores; False draws in turn).
PREFETCH = True

# One independent stream per random quantity (the order is part of the file's reproducibility).
# Streams are children of SeedSequence(seed) by position, so names added at the end leave the
# earlier streams (and the logit and seed designs' files) unchanged.
_STREAMS = ("truth", "sizes", "X", "choice", "dm", "cluster_shock", "coefficients", "alternatives")


@dataclass(frozen=True)
class SimulationSummary:
    """What `simulate_choice_data` wrote and how fast."""

    path: str
    design: str
    n_sets: int
    n_rows: int
    K: int
    M: int
    seed: int
    chunk_sets: int
    chunks: int
    n_clusters: int | None
    seconds: float
    cpu_seconds: float  # this process's CPU time (all threads) during the run
    bytes: int  # X and dm (the bulk of the file), float64
    file_bytes: int
    truth: list[float] | None
    truth_names: list[str] | None = None
    n_units: int | None = None  # decision makers (panel units) when stored
    nests: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.n_rows / self.seconds if self.seconds > 0 else math.inf

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else math.inf

    def line(self) -> str:
        """One line for stderr."""
        return (
            f"wrote {self.path}: {count(self.n_sets, 'set', thousands=True)}, {self.n_rows:,} rows, K={self.K}, M={self.M}, "
            f"{self.bytes / 1e6:,.1f} MB in {self.seconds:.2f} s: {self.rows_per_second:,.0f} rows/s, "
            f"{self.mb_per_second:,.0f} MB/s (CPU {self.cpu_seconds:.2f} s)"
            + (f"; {count(self.n_units, 'decision maker', thousands=True)}" if self.n_units is not None else "")
            + (f"; nests {self.nests}" if self.nests is not None else "")
        )


# -- instruments ------------------------------------------------------------------------------
def instrument_names(K: int, M: int) -> list[str]:
    """Names of the M instrument columns built from K covariates, in order: x1..xK, then squares
    minus one ("x1^2-1"), then pairwise products ("x1*x2", "x1*x3", ..., "x2*x3", ...), then
    cubes minus three times x ("x1^3-3*x1"). All have mean zero when x ~ N(0,1)."""
    available = 3 * K + K * (K - 1) // 2
    if M > available:
        raise UserError(
            f"{term('moments')} {M} is too many for {term('params')} {K}: the logit design builds at most "
            f"{available} instruments (x, squares, pairwise products, cubes); use {term('moments')} {available} or fewer"
        )
    names = itertools.chain(
        (f"x{k + 1}" for k in range(K)),
        (f"x{k + 1}^2-1" for k in range(K)),
        (f"x{a + 1}*x{b + 1}" for a, b in _pairs(K, M)),
        (f"x{k + 1}^3-3*x{k + 1}" for k in range(K)),
    )
    return list(itertools.islice(names, M))


def _pairs(K: int, limit: int) -> list[tuple[int, int]]:
    """The first `limit` pairs (a, b), a < b, in order (all K (K - 1) / 2 would not fit in memory
    for large K)."""
    pairs = ((a, b) for a in range(K) for b in range(a + 1, K))
    return list(itertools.islice(pairs, max(0, limit)))


def fill_instruments(X: np.ndarray, out: np.ndarray, minus: np.ndarray | None = None) -> None:
    """Write the instruments z of `instrument_names(K, M)` into out, less `minus` when given.

    X: (..., K); out: (..., M), M >= K; minus: broadcastable to out (for example the chosen
    rows' instruments as (n, 1, M) against (n, J, M) sets of one size). Subtracting inside
    each column group saves a separate pass over out."""
    K, M = X.shape[-1], out.shape[-1]

    def less(block, const, cols):
        # block -= const + minus[..., cols], in one pass over block
        if minus is None:
            if const:
                block -= const
        elif const:
            block -= minus[..., cols] + const
        else:
            block -= minus[..., cols]

    if minus is None:
        out[..., :K] = X
    else:
        np.subtract(X, minus[..., :K], out=out[..., :K])
    col = K
    q = min(K, M - col)
    if q > 0:
        sq = out[..., col : col + q]
        np.multiply(X[..., :q], X[..., :q], out=sq)
        less(sq, 1.0, slice(col, col + q))
        col += q
    pairs = _pairs(K, M - col)
    if pairs:
        ia = [a for a, _ in pairs]
        ib = [b for _, b in pairs]
        block = out[..., col : col + len(pairs)]
        np.multiply(X[..., ia], X[..., ib], out=block)
        less(block, 0.0, slice(col, col + len(pairs)))
        col += len(pairs)
    c = min(K, M - col)
    if c > 0:
        cube = out[..., col : col + c]
        x = X[..., :c]
        np.multiply(x, x, out=cube)
        cube -= 3.0
        cube *= x
        less(cube, 0.0, slice(col, col + c))


def true_params(rng: np.random.Generator, K: int) -> np.ndarray:
    """b: (K,), N(0,1) draws scaled to norm TRUTH_UTILITY_SD, so that u = X b with X ~ N(0,1) has
    standard deviation TRUTH_UTILITY_SD: choices are neither near-deterministic nor near-uniform."""
    b = rng.standard_normal(K)
    return b * (TRUTH_UTILITY_SD / np.linalg.norm(b))


# -- validation -------------------------------------------------------------------------------
def _check_options(design, sets, alternatives, params, moments, seed, cluster_size, chunk_sets) -> tuple[int, int]:
    if design not in DESIGNS:
        raise UserError(f"{term('design')} {design!r} is unknown; use one of {', '.join(DESIGNS)}{did_you_mean(design, DESIGNS)}")
    if int(sets) < 1:
        raise UserError(f"{term('sets')} {sets}: need at least 1 choice set")
    try:
        lo, hi = (int(a) for a in alternatives)
    except (TypeError, ValueError):
        raise UserError(f"{term('alternatives')} {alternatives!r}: expected a size like 30 or a range like 2:30") from None
    if lo < 2:
        raise UserError(
            f"{term('alternatives')} {lo}{'' if lo == hi else f':{hi}'}: a choice set needs at least 2 alternatives "
            "(one alternative carries no information); use e.g. 30 or 2:30"
        )
    if hi < lo:
        raise UserError(f"{term('alternatives')} {lo}:{hi}: the range is empty (the upper end is below the lower); use e.g. {hi}:{lo}")
    if int(params) < 1:
        raise UserError(f"{term('params')} {params}: need at least 1 covariate")
    for flag, n in ((term("params"), int(params)), (term("moments"), int(moments))):
        if n > MAX_COLUMNS:
            raise UserError(f"{flag} {n:,}: a choice-data file holds at most {MAX_COLUMNS:,} columns in X and in dm "
                            f"(their names are one HDF5 attribute); use {flag} {MAX_COLUMNS} or fewer")
    if int(moments) < int(params):
        raise UserError(
            f"{term('moments')} {moments} is below {term('params')} {params}: GMM needs at least as many moments as "
            f"parameters (M >= K); use {term('moments')} {params} or more"
        )
    if int(seed) < 0:
        raise UserError(f"{term('seed')} {seed}: the seed must be a non-negative integer")
    if cluster_size is not None and int(cluster_size) < 1:
        raise UserError(f"{term('cluster_size')} {cluster_size}: a cluster needs at least 1 set")
    if chunk_sets is not None and int(chunk_sets) < 1:
        raise UserError(f"chunk_sets {chunk_sets}: need at least 1 set per chunk")
    # Python integers have no limit, but offsets are int64: refuse before numpy overflows.
    if int(sets) * hi > MAX_ROWS:
        raise UserError(f"{term('sets')} {int(sets):,} with up to {hi:,} alternatives is more rows than a choice-data file can "
                        f"count ({MAX_ROWS:,}); simulate fewer sets")
    return lo, hi


def _buffer_bytes(chunk_sets: int, hi: int, K: int, M: int) -> int:
    """Memory of the simulation beyond the interpreter: two _Buffers sets (one filled while the
    other is written) plus the transients of a chunk (chosen rows' instruments, padded
    utilities for variable sizes, cluster shocks per row)."""
    rows = chunk_sets * hi
    buffers = rows * (8 * (K + 2 * M + 1) + 1) + 16 * chunk_sets
    transients = rows * 8 * (K + 4) + chunk_sets * 8 * (M + K + 2 * hi)
    return 2 * buffers + transients


def _check_memory(chunk_sets: int, hi: int, K: int, M: int) -> None:
    from estpipe.execution.memory import available_memory, gib

    need, have = _buffer_bytes(chunk_sets, hi, K, M), available_memory()
    if need > have:
        raise UserError(
            f"simulating needs about {gib(need)} of memory for its buffers ({chunk_sets:,} set(s) of up to {hi:,} "
            f"alternatives at a time, K = {K}, M = {M}), but only {gib(have)} is available; use fewer alternatives "
            f"({term('alternatives')}) or fewer columns ({term('params')}, {term('moments')})"
        )


# -- cluster shocks ---------------------------------------------------------------------------
class _ClusterShocks:
    """eta: one row of `width` coefficient shocks per cluster, drawn in cluster order from one
    generator; the last cluster's row is kept, since that cluster may continue in the next chunk."""

    def __init__(self, rng: np.random.Generator, cluster_size: int, width: int):
        self.rng, self.C, self.width = rng, cluster_size, width
        self._first = 0  # cluster id of self._table[0]
        self._table = np.zeros((0, width))

    def for_sets(self, s0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Cluster ids (n,) of sets s0..s0+n and their shocks (n, width)."""
        ids = np.arange(s0, s0 + n, dtype=np.int64) // self.C
        c0, c1 = int(ids[0]), int(ids[-1])
        have = self._first + len(self._table)  # first cluster not drawn yet
        keep = self._table[c0 - self._first :] if c0 < have else self._table[:0]
        new = self.rng.standard_normal((c1 + 1 - max(have, c0), self.width)) * (CLUSTER_SHOCK_SD / math.sqrt(self.width))
        self._table = np.concatenate([keep, new]) if len(keep) else new
        self._first = c0
        return ids, self._table[ids - c0]


# -- the simulation ---------------------------------------------------------------------------
def simulate_choice_data(
    path: str | os.PathLike,
    *,
    design: str = "logit",
    sets: int = 1000,
    alternatives: tuple[int, int] = (30, 30),
    params: int = 20,
    moments: int = 40,
    seed: int = 0,
    cluster_size: int | None = None,
    random: str | int | None = None,
    correlated: bool = False,
    panel_size: int | None = None,
    nests: int | None = None,
    chunk_sets: int | None = None,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> SimulationSummary:
    """Simulate `sets` choice sets and write them to the choice-data file `path`.

    Every design stores each row's alternative ("a1".."aJ", J the largest set size). The
    "mixed-logit" and "nested-logit" designs (data/simulate_models.py) take random (the random x
    columns, "x1,x2:-lognormal" or a count), correlated and panel_size (sets per decision maker;
    the panel units are stored), and nests (the number of nests; the nests text is stored).

    alternatives: (lo, hi), set sizes drawn uniformly in lo..hi per set (fixed when lo == hi).
    params, moments: K and M. cluster_size: contiguous clusters of that many sets (see the module
    docstring). chunk_sets: sets generated and written per step (memory is about
    chunk_sets * hi * (K + M) * 8 bytes times a small factor); the arrays do not depend on it.
    progress: show a progress bar on stderr when it is a terminal. should_stop: polled after every
    chunk; when it returns True the run stops with KeyboardInterrupt and leaves no file.
    """
    lo, hi = _check_options(design, sets, alternatives, params, moments, seed, cluster_size, chunk_sets)
    from estpipe.data import simulate_models

    simulate_models.check_design_options(design, cluster_size, random, correlated, panel_size, nests)
    if design in ("mixed-logit", "nested-logit"):
        return _simulate_model(path, design, int(sets), lo, hi, int(params), int(moments), int(seed), random,
                               correlated, panel_size, nests, chunk_sets, progress, should_stop)
    sets, K, M, seed = int(sets), int(params), int(moments), int(seed)
    logit = design == "logit"
    moment_names = instrument_names(K, M) if logit else [f"u{m + 1}" for m in range(M)]
    param_names = [f"x{k + 1}" for k in range(K)]
    target_rows = min(TARGET_CHUNK_ROWS, TARGET_CHUNK_BYTES // (8 * (K + 2 * M + 1)))
    chunk_sets = int(chunk_sets) if chunk_sets is not None else max(1, target_rows // hi)
    chunk_sets = min(chunk_sets, sets)
    n_chunks = -(-sets // chunk_sets)
    _check_memory(chunk_sets, hi, K, M)

    streams = dict(zip(_STREAMS, (np.random.Generator(np.random.SFC64(s)) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    truth = true_params(streams["truth"], K) if logit else None
    shocks = _ClusterShocks(streams["cluster_shock"], int(cluster_size), K) if cluster_size else None

    options = dict(design=design, sets=sets, alternatives=[lo, hi], params=K, moments=M, seed=seed, cluster_size=cluster_size)
    prov = provenance("estpipe simulate", options=options, seed=seed, design=design)
    if logit:
        prov["truth_utility_sd"] = TRUTH_UTILITY_SD
        if cluster_size:
            prov["cluster_shock_sd"] = CLUSTER_SHOCK_SD
    else:
        prov["estimable"] = False
        prov["note"] = "seed design: timing only; dm ~ U(0,1) > 0, so the GMM problem has no finite minimizer"

    chunks = _ChunkSimulator(streams, truth, shocks, lo, hi, K, M, chunk_sets)
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = _Progress(sets, enabled=progress)
    writer = ChoiceDataWriter(
        path, param_names, moment_names, provenance=prov, with_chosen=logit,
        with_cluster=cluster_size is not None, truth=truth, alt_names=simulate_models.alternative_names(hi),
        # HDF5 allocates whole chunks: a small file gets one small chunk, not 16,384 rows.
        chunk_rows=min(DEFAULT_CHUNK_ROWS, sets * lo),
    )
    outputs.check_writable(path, "")
    # the expected rows (set sizes are uniform in lo..hi)
    need = estimated_file_bytes(sets * (lo + hi) // 2, sets, K, M, logit, cluster_size is not None, True)
    outputs.check_free_space(
        path, need,
        f"simulate fewer sets ({term('sets')}), alternatives or columns ({term('params')}, {term('moments')}), or write to another folder")
    # One BLAS thread: the only BLAS call is a small matrix-vector product per chunk, and idle
    # OpenBLAS threads spin after each call, doubling the CPU time and slowing the writer.
    with writer, bar, threadpool_limits(limits=1, user_api="blas"):
        for s0, c in (_chunks_prefetched if PREFETCH else _chunks_in_turn)(chunks, sets, chunk_sets):
            writer.append(c.X, c.dm, c.sizes, chosen=c.chosen, cluster=c.cluster, alt=_positions(c.sizes, lo, hi))
            bar.advance(len(c.sizes))
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    n_rows = writer.n_rows
    return SimulationSummary(
        path=str(path), design=design, n_sets=sets, n_rows=n_rows, K=K, M=M, seed=seed,
        chunk_sets=chunk_sets, chunks=n_chunks,
        n_clusters=-(-sets // int(cluster_size)) if cluster_size else None,
        seconds=seconds, cpu_seconds=cpu_seconds, bytes=n_rows * (K + M) * 8, file_bytes=Path(path).stat().st_size,
        truth=truth.tolist() if truth is not None else None,
        truth_names=list(param_names) if truth is not None else None,
    )


def _positions(sizes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(rows,) int32 each row's position in its set: its alternative code (a1 is code 0)."""
    if lo == hi:
        return np.tile(np.arange(lo, dtype=np.int32), len(sizes))
    rows = int(sizes.sum())
    return (np.arange(rows) - np.repeat(np.cumsum(sizes) - sizes, sizes)).astype(np.int32)


def _simulate_model(path, design, sets, lo, hi, K, M, seed, random, correlated, panel_size, nests,
                    chunk_sets, progress, should_stop) -> SimulationSummary:
    """The mixed-logit and nested-logit designs (data/simulate_models.py), written in chunks of
    whole decision makers."""
    from estpipe.data import simulate_models as sm

    streams = dict(zip(_STREAMS, (np.random.Generator(np.random.SFC64(s)) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))
    b = true_params(streams["truth"], K)
    if design == "mixed-logit":
        model = sm.MixedLogitDesign(K, M, lo, hi, b, streams["truth"], random, correlated, panel_size)
    else:
        model = sm.NestedLogitDesign(K, M, lo, hi, b, streams["truth"], nests)
    truth, truth_names = model.truth()
    moment_names = model.moment_names()
    P = len(truth)
    if M < P:
        raise UserError(f"{term('moments')} {M} is below the {P} parameters of the {design} design "
                        f"({', '.join(truth_names)}); GMM needs M >= P: use {term('moments')} {P} or more")
    options = dict(design=design, sets=sets, alternatives=[lo, hi], params=K, moments=M, seed=seed)
    if design == "mixed-logit":
        options.update(random=model.random_text, correlated=bool(correlated), panel_size=panel_size)
    else:
        options.update(nests=model.N)
    prov = provenance("estpipe simulate", options=options, seed=seed, design=design)
    prov["truth_utility_sd"] = TRUTH_UTILITY_SD
    target_rows = min(TARGET_CHUNK_ROWS, TARGET_CHUNK_BYTES // (8 * (K + 3 * M + 1)))
    chunk_sets = min(int(chunk_sets) if chunk_sets is not None else max(1, target_rows // hi), sets)
    _check_memory(chunk_sets, hi, K, M)
    with_panel = design == "mixed-logit" and panel_size is not None
    writer = ChoiceDataWriter(
        path, list(model.x_names), moment_names, provenance=prov, with_chosen=True, truth=truth,
        truth_names=truth_names, alt_names=model.alternatives(), with_panel=with_panel,
        nests=model.nests if design == "nested-logit" else None,
        chunk_rows=min(DEFAULT_CHUNK_ROWS, sets * lo),
    )
    outputs.check_writable(path, "")
    need = estimated_file_bytes(sets * (lo + hi) // 2, sets, K, M, True, False, True, with_panel)
    outputs.check_free_space(
        path, need,
        f"simulate fewer sets ({term('sets')}), alternatives or columns ({term('params')}, {term('moments')}), or write to another folder")
    t0, cpu0 = time.perf_counter(), time.process_time()
    n_chunks = 0
    with writer, _Progress(sets, enabled=progress) as bar, threadpool_limits(limits=1, user_api="blas"):
        for s0, c in sm.simulate_chunks(model, streams, sets, chunk_sets):
            writer.append(c.X, c.dm, c.sizes, chosen=c.chosen, alt=c.alt, panel=c.panel)
            n_chunks += 1
            bar.advance(len(c.sizes))
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    n_rows = writer.n_rows
    return SimulationSummary(
        path=str(path), design=design, n_sets=sets, n_rows=n_rows, K=K, M=M, seed=seed,
        chunk_sets=chunk_sets, chunks=n_chunks, n_clusters=None, seconds=seconds, cpu_seconds=cpu_seconds,
        bytes=n_rows * (K + M) * 8, file_bytes=Path(path).stat().st_size, truth=truth.tolist(),
        truth_names=list(truth_names), n_units=-(-sets // int(panel_size)) if with_panel else None,
        nests=model.nests if design == "nested-logit" else None,
    )


@dataclass
class _Chunk:
    """One chunk of whole sets, in buffers owned by a _Buffers. X: (rows, K); dm: (rows, M);
    sizes: (n,); chosen: (rows,) int8 or None; cluster: (n,) int64 or None."""

    X: np.ndarray
    dm: np.ndarray
    sizes: np.ndarray
    chosen: np.ndarray | None
    cluster: np.ndarray | None


class _Buffers:
    """Preallocated arrays for one chunk of at most `max_sets` sets of at most `hi` rows."""

    def __init__(self, max_sets: int, hi: int, K: int, M: int):
        max_rows = max_sets * hi
        self.X = np.empty((max_rows, K))
        self.dm = np.empty((max_rows, M))
        self.minus = np.empty((max_rows, M))  # used (so its pages touched) only for variable sizes
        self.utilities = np.empty(max_rows)
        self.chosen = np.empty(max_rows, dtype=np.int8)
        self.size_draws = np.empty(max_sets)
        self.choice_draws = np.empty(max_sets)


class _ChunkSimulator:
    """Draws chunks of sets in order, each from the streams' next draws (see the module docstring)."""

    def __init__(self, streams, truth, shocks, lo, hi, K, M, chunk_sets):
        self.streams, self.truth, self.shocks = streams, truth, shocks
        self.lo, self.hi, self.K, self.M, self.chunk_sets = lo, hi, K, M, chunk_sets

    def buffers(self) -> _Buffers:
        return _Buffers(self.chunk_sets, self.hi, self.K, self.M)

    def draw_random(self, n: int, buf: _Buffers) -> _Chunk:
        """The next n sets' sizes, X, and (seed design) dm into buf: the bulk of the random draws,
        which release the GIL and so can run in a thread while the last chunk is written."""
        streams, lo, hi = self.streams, self.lo, self.hi
        if lo == hi:
            sizes = np.full(n, lo, dtype=np.int64)
        else:
            u = buf.size_draws[:n]
            streams["sizes"].random(out=u)
            sizes = lo + (u * (hi - lo + 1)).astype(np.int64)
        rows = int(sizes.sum())
        X, dm = buf.X[:rows], buf.dm[:rows]
        streams["X"].standard_normal(out=X)
        if self.truth is None:
            streams["dm"].random(out=dm)
        return _Chunk(X, dm, sizes, None, None)

    def finish(self, s0: int, chunk: _Chunk, buf: _Buffers) -> _Chunk:
        """Sets s0.. of `chunk` (from draw_random): cluster ids, and for the logit design the
        choices and dm."""
        lo, hi, M = self.lo, self.hi, self.M
        X, dm, sizes = chunk.X, chunk.dm, chunk.sizes
        n, rows = len(sizes), len(X)
        cluster_ids, eta = self.shocks.for_sets(s0, n) if self.shocks else (None, None)
        if self.truth is None:
            return _Chunk(X, dm, sizes, None, cluster_ids)
        uc = buf.choice_draws[:n]
        self.streams["choice"].random(out=uc)
        utilities = buf.utilities[:rows]
        # np.dot, not np.matmul: matmul with out= and a vector operand skips BLAS (40x slower here)
        np.dot(X, self.truth, out=utilities)
        if eta is not None:
            if lo == hi:
                utilities += np.einsum("njk,nk->nj", X.reshape(n, lo, self.K), eta).reshape(-1)
            else:
                utilities += np.einsum("jk,jk->j", X, np.repeat(eta, sizes, axis=0))
        pick = _draw_choices(utilities, sizes, lo, hi, uc)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        chosen_rows = starts + pick
        chosen = buf.chosen[:rows]
        chosen[:] = 0
        chosen[chosen_rows] = 1
        z_chosen = np.empty((n, M))
        fill_instruments(X[chosen_rows], z_chosen)
        if lo == hi:
            fill_instruments(X.reshape(n, lo, self.K), dm.reshape(n, lo, M), minus=z_chosen[:, None, :])
        else:
            # Each row's set's chosen instruments, gathered into a reused buffer (a fresh
            # (rows, M) array per chunk costs page faults).
            minus = buf.minus[:rows]
            np.take(z_chosen, np.repeat(np.arange(n), sizes), axis=0, out=minus)
            fill_instruments(X, dm, minus=minus)
        return _Chunk(X, dm, sizes, chosen, cluster_ids)


def _chunks_in_turn(sim: _ChunkSimulator, sets: int, chunk_sets: int):
    """(s0, chunk) in set order, each drawn when the last has been consumed."""
    buf = sim.buffers()
    for s0 in range(0, sets, chunk_sets):
        yield s0, sim.finish(s0, sim.draw_random(min(chunk_sets, sets - s0), buf), buf)


def _chunks_prefetched(sim: _ChunkSimulator, sets: int, chunk_sets: int):
    """(s0, chunk) in set order; a thread draws the next chunk's random numbers (GIL released)
    while the caller writes the last one (h5py holds the GIL while it writes). Two buffer sets
    alternate; each stream is still consumed by one thread in set order, so the arrays are the
    same as in turn."""
    from concurrent.futures import ThreadPoolExecutor

    starts = list(range(0, sets, chunk_sets))
    bufs = [sim.buffers(), sim.buffers()]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="estpipe-draw") as pool:
        pending = pool.submit(sim.draw_random, min(chunk_sets, sets), bufs[0])
        for i, s0 in enumerate(starts):
            drawn = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(sim.draw_random, min(chunk_sets, sets - starts[i + 1]), bufs[(i + 1) % 2])
            yield s0, sim.finish(s0, drawn, bufs[i % 2])


def _draw_choices(utilities, sizes, lo, hi, uniforms) -> np.ndarray:
    """Position (0-based, within its set) of the chosen row of each set, drawn by inverting the
    cumulative logit probabilities with one uniform per set.

    utilities: (rows,) for sets of `sizes` (n,); uniforms: (n,) in [0, 1)."""
    n = len(sizes)
    if lo == hi:
        v = utilities.reshape(n, lo)
    else:
        # Pad to (n, hi): missing positions get -inf and so probability zero.
        v = np.full((n, hi), -np.inf)
        v[np.arange(hi) < sizes[:, None]] = utilities
    w = v - v.max(axis=1, keepdims=True)
    np.exp(w, out=w)
    np.cumsum(w, axis=1, out=w)
    # The first position whose cumulative weight exceeds u * total; the last real position always
    # qualifies since u < 1, so padded positions are never picked.
    return np.argmax(w > uniforms[:, None] * w[:, -1:], axis=1)


class _Progress:
    """A rich progress bar on stderr, shown only when asked and stderr is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self._bar = Progress(
                "simulate", BarColumn(), MofNCompleteColumn(), "sets", TimeRemainingColumn(),
                console=Console(stderr=True), transient=True,
            )
            self._task = self._bar.add_task("simulate", total=total)

    def __enter__(self):
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
