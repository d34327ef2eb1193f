"""One partition's kernel: its data, resident, and the additive sums an evaluation returns.

    k = PartitionKernel(data, model="logit", derivatives="dual", tile_rows=None)
    k.n_params                                   P, the model's parameter count
    k.evaluate(Request) -> MomentSums           what the request needs (kernel/request.py);
                                                 LikelihoodSums for a "likelihood" request
    k.pullback_of(Request, v) -> (P,)            sum_i (dh_i/dbeta)' v, i.e. n G' v
    k.sums(params, jacobian=True, ...)           the same as evaluate, from keyword arguments

The kernel picks its strategy once, from the model: the fused logit kernel, with its reverse rule,
for the textbook logit (kernel/fused_logit.py), and the generic dual kernel for every other model
(kernel/generic.py; also for complex-step parameters, which the fused one does not take). The
derivative mode (kernel/derivatives.py) composes the engine's three passes: `forward` (the
strategy's sums over the tiles, with partials when the request needs the Jacobian),
`forward_pullback` and `reverse_pullback`. The only state an evaluation leaves is the adjoint's
tape, recorded by its value pass; the memo of whole evaluations by parameter vector lives in the
estimator's oracle.

Threads: the tiles are independent, so a kernel runs them on `threads` threads (default: the
number of BLAS threads it finds, so a dask worker given one BLAS thread stays serial): the calling
thread and a pool of threads - 1 (kept until close()), each thread with its own workspace and
partial sums, while BLAS is held to one thread for the call. The covariance pass runs on the
threads too: each tile closes the units inside it and hands on the open ones at its ends, which
are joined in tile order (kernel/units.py).
Per-tile products are too small for BLAS's own threading to pay (measured: a 4,096-row tile
GEMM gains ~10% from a second BLAS thread), and one thread per tile stream parallelises the
softmax and the other passes too. Buffers are allocated on the first evaluation and reused;
two kernels never share buffers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from estpipe.data.format import ChoiceData
from estpipe.dual import Workspace
from estpipe.kernel.blas import blas_threads, keep_freed_memory, restart_stale_openblas
from estpipe.kernel.blas import controller as _blas_controller
from estpipe.kernel.derivatives import DERIVATIVES
from estpipe.kernel.fused_logit import FusedLogit
from estpipe.kernel.fused_mixed import FusedMixed
from estpipe.kernel.fused_nested import FusedNested
from estpipe.kernel.generic import GenericDual
from estpipe.kernel.likelihood import likelihood_sums
from estpipe.kernel.request import Request
from estpipe.kernel.sums import MomentSums
from estpipe.kernel.units import UnitSums
from estpipe.kernel.tiles import DEFAULT_TILE_ROWS, TileData, plan_tiles
from estpipe.models import get_model
from estpipe.models.logit import Logit
from estpipe.models.mixed_logit import MixedLogit
from estpipe.models.nested_logit import NestedLogit

STRIPE_FACTOR = 8


def strategy_class(model, fast: bool = True):
    """The kernel's strategy for `model`, chosen once: the fused logit for the textbook logit
    itself (not a subclass, not a user's model file that writes the same utilities), else the
    generic dual strategy."""
    if fast and type(model) is Logit:
        return FusedLogit
    if fast and type(model) is MixedLogit:
        return FusedMixed
    if fast and type(model) is NestedLogit:
        return FusedNested
    return GenericDual


def choose_strategy(model, K: int, fast: bool = True, chunk: int | None = None):
    cls = strategy_class(model, fast)
    if cls is FusedLogit:
        return FusedLogit()
    if cls is FusedMixed:
        return FusedMixed(model)
    if cls is FusedNested:
        return FusedNested(model)
    return GenericDual(model, K, chunk)


def gradient_rule(model, derivatives: str) -> str:
    """How the gradients of `model` (a Model or a registered name) come out under `derivatives`
    (for logs and results)."""
    m = get_model(model)
    return DERIVATIVES.get(derivatives).gradient_rule(strategy_class(m), m)


class PartitionKernel:
    """data: ChoiceData (X (n_rows, K), dm (n_rows, M), offsets, chosen, cluster), kept resident.

    fast: use the fused logit strategy when the model is the logit (tests turn it off to compare).
    chunk: partials per dual block (default: chunks.chunk_size's rule).
    threads: threads over tiles (default: the BLAS thread count)."""

    _pool_pid: int | None = None  # the process that started _pool

    def __init__(self, data: ChoiceData, model: str = "logit", derivatives: str = "dual",
                 tile_rows: int | None = None, fast: bool = True, chunk: int | None = None,
                 threads: int | None = None, x_names=None):
        keep_freed_memory()  # the evaluations' large temporaries are reused, not mapped anew (kernel/blas.py)
        self.data = data
        self.x_names = tuple(x_names) if x_names is not None else tuple(f"x{k + 1}" for k in range(data.K))
        self.model = get_model(model)
        self.derivative = DERIVATIVES.get(derivatives)
        self.n_params = self.model.n_params(data.K)
        self.strategy = choose_strategy(self.model, data.K, fast, chunk)
        # the forward projection and complex steps need the generic strategy whatever the model
        self.generic = self.strategy if isinstance(self.strategy, GenericDual) else GenericDual(self.model, data.K, chunk)
        # Tiles hold whole panel units (a decision maker's sets share its draws; a likelihood is per unit)
        # A strategy whose rows cost more than the logit's (draws) names its own tile size.
        tile_rows = tile_rows or getattr(self.strategy, "tile_rows", None)
        self.tiles = plan_tiles(data.offsets, tile_rows, data.panel)
        # Value-only passes (no Jacobian, no covariance) and the reverse pass hold only a few
        # (rows,) vectors per tile, so they use longer stripes: fewer numpy calls per evaluation
        # (not for a strategy that sizes its own tiles: its value pass costs what its Jacobian does).
        stripe_rows = tile_rows if getattr(self.strategy, "tile_rows", None) else STRIPE_FACTOR * (tile_rows or DEFAULT_TILE_ROWS)
        self.stripes = plan_tiles(data.offsets, stripe_rows, data.panel)
        self.threads = max(1, int(threads if threads is not None else blas_threads()))
        self._workspaces = [Workspace() for _ in range(self.threads)]
        self._pool = None
        # The adjoint's tape: the probabilities s of its last value pass (8 bytes per row), which
        # its reverse rule reads when the pullback comes at the same parameters (the optimizer's
        # next call: a gradient right after its value).
        self._tape = np.empty(data.n_rows) if (self.strategy.reverse and self.derivative.name == "adjoint") else None
        self._tape_params = None
        self._chosen = [self._tile_chosen(t) for t in self.tiles] if data.chosen is not None else None
        self._dm_single = None
        self._absmax = None
        self._views: dict[tuple[int, int], TileData] = {}
        self._tile_index = {t.set_start: i for i, t in enumerate(self.tiles)}

    @property
    def derivatives(self) -> str:
        return self.derivative.name

    @property
    def fast(self) -> bool:
        return isinstance(self.strategy, FusedLogit)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return self.generic.chunks

    @property
    def gradient_rule(self) -> str:
        return self.derivative.gradient_rule(self.strategy, self.model)

    def __getstate__(self):  # a thread pool does not pickle; a copy gets its own
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_workspaces"] = [Workspace() for _ in range(self.threads)]
        return state

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the reusable tile buffers of all threads (memory beyond the data; the
        adjoint residual is counted separately in residual_nbytes)."""
        return sum(ws.nbytes for ws in self._workspaces)

    @property
    def single_nbytes(self) -> int:
        """Bytes of the float32 copy of dm (made on the first precision="single" call)."""
        return 0 if self._dm_single is None else self._dm_single.nbytes

    @property
    def residual_nbytes(self) -> int:
        """Bytes of the adjoint's tape (8 per row; 0 without one)."""
        return 0 if self._tape is None else self._tape.nbytes

    def _tile_chosen(self, tile):
        rows = np.flatnonzero(self.data.chosen[tile.rows])
        return rows, np.searchsorted(tile.seg.offsets, rows, side="right") - 1

    def _map(self, work, tiles) -> list:
        """work(ws, tiles_subset) on every thread's share of the tiles (round robin), BLAS held
        to one thread meanwhile; the list of the results.

        The calling thread takes the first share itself rather than waiting: one thread fewer to
        wake per evaluation, and to start for a new kernel (measured at 1,000 x 30 on 2 threads:
        -8% per evaluation, -17% for a fresh kernel's first)."""
        threads = min(self.threads, len(tiles))
        if threads <= 1:
            return [work(self._workspaces[0], tiles)]
        pool = self._tile_pool()
        # An OpenBLAS loaded before estpipe keeps its workers spinning ~0.1 s after each threaded
        # call, taking a core from the tile threads: restart them with the short timeout (blas.py).
        restart_stale_openblas(_blas_controller())
        with _blas_controller().limit(limits=1, user_api="blas"):
            futures = [pool.submit(work, self._workspaces[i], tiles[i::threads]) for i in range(1, threads)]
            try:
                first = work(self._workspaces[0], tiles[0::threads])
            finally:  # the other shares still use their workspaces: never return before they end
                wait(futures)
            return [first, *(f.result() for f in futures)]

    def _tile_pool(self) -> ThreadPoolExecutor:
        """The tile threads beside the calling one, started on first use, and again in a forked
        child: it inherits the pool but not its threads, and would wait for them forever."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="estpipe-tiles")
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        """Stop the tile threads (an evaluation after this starts them again)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown()
        self._pool = None

    def view(self, tile) -> TileData:
        """What the model sees of `tile` (X, its sets, alternative codes, panel units): made once
        per tile (slices of the data, and the tile's unit indices, 8 bytes per set)."""
        cached = self._views.get((tile.set_start, tile.set_stop))
        if cached is not None:
            return cached
        d = self.data
        if d.panel is not None:
            unit = d.panel[tile.set_start : tile.set_stop]
        else:
            unit = np.arange(d.first_set + tile.set_start, d.first_set + tile.set_stop, dtype=np.int64)
        view = TileData(X=d.X[tile.rows], seg=tile.seg, alt=None if d.alt is None else d.alt[tile.rows], unit=unit,
                        x_names=self.x_names)
        self._views[(tile.set_start, tile.set_stop)] = view
        return view

    # -- data facts ------------------------------------------------------------------------------
    def column_absmax(self) -> tuple[np.ndarray, np.ndarray]:
        """max |X| per column (K,) and max |dm| per column (M,) of this partition (computed once):
        the data's own units, from which the estimator picks its seed and moment scales."""
        if self._absmax is None:
            d = self.data
            x = np.abs(d.X).max(axis=0) if d.n_rows else np.zeros(d.K)
            m = np.abs(d.dm).max(axis=0) if d.n_rows else np.zeros(d.M)
            self._absmax = (x, m)
        return self._absmax

    def within_set_covariance(self, inv_scale: np.ndarray) -> tuple[np.ndarray, int]:
        """sum over sets and rows of (x - xbar_set)(x - xbar_set)' (K, K) for x = X * inv_scale
        (inv_scale (K,)), with xbar_set the plain mean of the set's rows, and the row count: what
        says whether columns of X are collinear within sets (only then is a logit unidentified
        whatever the instruments). Not a hot path: used to explain an identification failure."""
        d = self.data
        out = np.zeros((d.K, d.K))
        for tile in self.tiles:
            Xs = d.X[tile.rows] * inv_scale
            seg = tile.seg
            means = np.add.reduceat(Xs, seg.starts, axis=0) / seg.sizes[:, None]
            dev = Xs - np.repeat(means, seg.sizes, axis=0)
            out += dev.T @ dev
        return out, d.n_rows

    def _prescale(self, inv_scale) -> bool:
        """Whether the fused kernel must scale s X before its GEMM: when max |x| max |dm| times a
        tile's rows could overflow the unscaled tile product (data in units near 1e150)."""
        if inv_scale is None:
            return False
        x, m = self.column_absmax()
        rows = max((t.row_stop - t.row_start for t in self.tiles), default=1)
        with np.errstate(over="ignore"):
            return not float(x.max(initial=0.0)) * float(m.max(initial=0.0)) * rows < 1e290

    # -- evaluations -----------------------------------------------------------------------------
    def sums(self, params, jacobian: bool = True, covariance: bool = False, clustered: bool = True,
             precision: str = "double", seed_scale=None, moment_scale=None, fd_steps=None) -> MomentSums:
        """evaluate(Request.of(params, jacobian, covariance, ...)): MomentSums of this partition at
        params (P,): gG (M, 1 + P) with the Jacobian, (M, 1) without; hh/nh/nn and loglik too with
        covariance (per clusters when clustered and the data have cluster ids). Complex params
        give complex sums (complex-step derivatives). See Request for the scales and steps.

        precision="single": the Jacobian's GEMM runs in float32 on a float32 copy of dm made on
        first use (half of dm's bytes, see single_nbytes); for search directions only. The values
        stay float64; the final Jacobian (standard errors) must use "double", the default. Only
        the fused logit has it; the other strategies ignore it."""
        return self.evaluate(Request.of(params, jacobian, covariance, clustered=clustered, precision=precision,
                                        seed_scale=seed_scale, moment_scale=moment_scale, fd_steps=fd_steps))

    def pullback(self, params, v, seed_scale=None, fd_steps=None) -> np.ndarray:
        """pullback_of(Request.of(params, jacobian=False, ...), v)."""
        return self.pullback_of(Request.of(np.asarray(params, dtype=np.float64), False, seed_scale=seed_scale,
                                           fd_steps=fd_steps), v)

    def evaluate(self, request: Request) -> MomentSums:
        """The additive sums `request` needs, by this kernel's derivative mode (a likelihood
        request: its LikelihoodSums, by dual blocks whatever the mode)."""
        if np.shape(request.params) != (self.n_params,):
            raise ValueError(f"params must have shape ({self.n_params},), got {np.shape(request.params)}")
        if request.likelihood:
            return likelihood_sums(self, request)
        return self.derivative.sums(self, request)

    def pullback_of(self, request: Request, v) -> np.ndarray:
        """sum_i (dh_i/dbeta)' v (P,) for v (M,): n G' v without forming G, beta = seed_scale params."""
        return self.derivative.pullback(self, request, np.asarray(v, dtype=np.float64))

    # -- the passes the derivative modes compose ------------------------------------------------------
    def forward(self, request: Request, record: bool = False) -> MomentSums:
        """The strategy's sums over all tiles: partials when the request needs the Jacobian, unit
        sums when it needs the covariance. record: keep the probabilities as the adjoint's tape
        (value passes of a strategy with a reverse rule only)."""
        d = self.data
        params = request.params
        strategy = self.generic if request.complex_step else self.strategy
        dtype = np.complex128 if request.complex_step else np.float64
        fused = isinstance(strategy, FusedLogit)
        width = 1 + self.n_params if request.jacobian else 1
        M = d.M
        if not (request.jacobian or request.covariance):
            tape = self._tape if (record and fused and self._tape is not None) else None
            if tape is not None:
                self._tape_params = None

            def values(ws, tiles):
                acc = np.zeros((M, 1), dtype=dtype)
                for tile in tiles:
                    strategy.tile_values(self.view(tile), d.dm[tile.rows], request, ws, acc,
                                         None if tape is None else tape[tile.rows])
                return acc

            acc = sum(self._map(values, self.stripes if fused else self.tiles))
            if tape is not None:
                self._tape_params = np.array(params, copy=True)
            return MomentSums(n_sets=d.n_sets, gG=acc, moment_scale=request.moment_scale)

        single = fused and request.jacobian and not request.covariance and request.precision == "single"
        if single and self._dm_single is None:
            self._dm_single = d.dm.astype(np.float32)
        prescale = fused and request.jacobian and self._prescale(request.inv_seed_scale)
        # the independent units: the file's clusters (unless not asked for), else its panel units
        # (decision makers), else the sets
        cluster = None
        if request.covariance:
            cluster = d.cluster if (request.clustered and d.cluster is not None) else d.panel
        index = self._tile_index

        def work(ws, tiles):
            acc = np.zeros((M, width), dtype=dtype)
            units = UnitSums.empty(M, dtype) if request.covariance else None
            loglik = 0.0
            for tile in tiles:
                i = index[tile.set_start]
                chosen = self._chosen[i] if (self._chosen is not None and request.covariance) else None
                extra = {"dm_single": self._dm_single[tile.rows]} if single else {}
                H, ll = strategy.tile_sums(self.view(tile), d.dm[tile.rows], request, ws, acc, request.covariance,
                                           chosen, prescale=prescale, **extra)
                if units is not None:
                    loglik += ll
                    ids = None if cluster is None else cluster[tile.set_start : tile.set_stop]
                    units.add_tile(i, H, ids, request.moment_scale)
            return acc, units, loglik

        parts = self._map(work, self.tiles)
        acc = sum(p[0] for p in parts)
        if not request.covariance:
            return MomentSums(n_sets=d.n_sets, gG=acc, moment_scale=request.moment_scale)
        units = parts[0][1]
        for p in parts[1:]:
            units = units + p[1]
        units.merge()
        return MomentSums(n_sets=d.n_sets, gG=acc, hh=units.hh, nh=units.nh, nn=units.nn, n_units=units.n_units,
                          loglik=float(sum(p[2] for p in parts)), moment_scale=request.moment_scale)

    def forward_pullback(self, request: Request, v: np.ndarray) -> np.ndarray:
        """n G' v by the forward partials of v'h, for any model (by the strategy itself when it has
        no reverse rule: its pullback is that projection)."""
        d = self.data
        strategy = self.generic if self.strategy.reverse else self.strategy

        def work(ws, tiles):
            acc = np.zeros(self.n_params)
            for tile in tiles:
                strategy.tile_pullback(self.view(tile), d.dm[tile.rows], request, v, ws, acc)
            return acc

        return sum(self._map(work, self.tiles))

    def reverse_pullback(self, request: Request, v: np.ndarray) -> np.ndarray:
        """n G' v by the strategy's reverse rule, reading the tape when it was recorded at these
        parameters (else the rule recomputes the probabilities)."""
        d = self.data
        params = request.params
        on_tape = self._tape_params is not None and np.array_equal(self._tape_params, params)
        prescale = self._prescale(request.inv_seed_scale)

        def work(ws, tiles):
            acc = np.zeros(self.n_params)
            for tile in tiles:
                self.strategy.tile_pullback(self.view(tile), d.dm[tile.rows], request, v, ws, acc,
                                            self._tape[tile.rows] if on_tape else None, prescale)
            return acc

        return sum(self._map(work, self.stripes))
