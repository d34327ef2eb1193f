"""One partition's kernel: its data, resident, and what an evaluation returns (MomentSums).

Contract used by the execution back ends (do not change the signatures without updating them):

    k = PartitionKernel(data, model="logit", derivatives="dual", tile_rows=None)
    k.n_params                                   P, the model's parameter count
    k.sums(params, jacobian=True, covariance=False, clustered=True) -> MomentSums
    k.pullback(params, v) -> (P,)                sum_i (dh_i/db)' v, i.e. n G' v (reverse mode)

Derivative modes (DERIVATIVES):
- dual: forward dual blocks, one GEMM per tile gives the moments and their Jacobian together;
  pullback is the forward partials of v'h (a GEMV instead of the GEMM).
- adjoint: the same sums; pullback is the reverse-mode rule (logit: X' (s (w - wbar_i)) with
  w = dm v, about one more read of the data). Models without a hand-written reverse rule use the
  forward projection of v'h.
- fd: one-sided finite differences, P + 1 value evaluations (the baseline).

Threads: the tiles are independent, so a kernel runs them on `threads` threads (default: the
number of BLAS threads it finds, so a dask worker given one BLAS thread stays serial): the calling
thread and a pool of threads - 1 (kept until close()), each thread with its own workspace and
partial sums, while BLAS is held to one thread for the call.
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
from estpipe.dual import Workspace, chunk_ranges, chunk_size
from estpipe.errors import UserError
from estpipe.kernel.blas import restart_stale_openblas
from estpipe.kernel.covariance import UnitSums
from estpipe.kernel.generic import generic_tile_pullback, generic_tile_sums
from estpipe.kernel.logit_fast import logit_probabilities, logit_tile_pullback, logit_tile_sums
from estpipe.kernel.sums import MomentSums
from estpipe.kernel.tiles import DEFAULT_TILE_ROWS, plan_tiles
from estpipe.models import get_model

DERIVATIVES = ("dual", "adjoint", "fd")
STRIPE_FACTOR = 8
_CONTROLLER = None


def _blas_controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def blas_threads() -> int:
    """The largest thread count among the BLAS libraries loaded (1 when none is found)."""
    return max([lib.num_threads for lib in _blas_controller().select(user_api="blas").lib_controllers] or [1])


class PartitionKernel:
    """data: ChoiceData (X (n_rows, K), dm (n_rows, M), offsets, chosen, cluster), kept resident.

    fast: use the hand-fused logit path when the model is logit (tests turn it off to compare).
    chunk: partials per dual block (default: chunks.chunk_size's rule).
    threads: threads over tiles (default: the BLAS thread count)."""

    _pool_pid: int | None = None  # the process that started _pool

    def __init__(self, data: ChoiceData, model: str = "logit", derivatives: str = "dual",
                 tile_rows: int | None = None, fast: bool = True, chunk: int | None = None,
                 threads: int | None = None):
        if derivatives not in DERIVATIVES:
            raise UserError(f"unknown derivatives {derivatives!r}; allowed: {', '.join(DERIVATIVES)} (--derivatives)")
        self.data = data
        self.model = get_model(model)
        self.derivatives = derivatives
        self.n_params = self.model.n_params(data.K)
        self.fast = fast and self.model.name == "logit"
        self.chunks = chunk_ranges(self.n_params, chunk_size(self.n_params, chunk))
        self.tiles = plan_tiles(data.offsets, tile_rows)
        # Value-only passes (no Jacobian, no covariance) and the reverse pass hold only a few
        # (rows,) vectors per tile, so they use longer stripes: fewer numpy calls per evaluation.
        self.stripes = plan_tiles(data.offsets, STRIPE_FACTOR * (tile_rows or DEFAULT_TILE_ROWS))
        self.threads = max(1, int(threads if threads is not None else blas_threads()))
        self._workspaces = [Workspace() for _ in range(self.threads)]
        self._pool = None
        # Reverse mode keeps its forward residual, the probabilities s of the last value-only
        # evaluation (8 bytes per row), so the pullback at the same parameters (the optimizer's
        # next call, as in scipy's MemoizeJac) does not recompute them.
        self._residual = np.empty(data.n_rows) if (self.fast and derivatives == "adjoint") else None
        self._residual_params = None
        self._chosen = [self._tile_chosen(t) for t in self.tiles] if data.chosen is not None else None
        self._dm_single = None

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
        return 0 if self._residual is None else self._residual.nbytes

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

    # -- evaluations -----------------------------------------------------------------------------
    def sums(self, params, jacobian: bool = True, covariance: bool = False, clustered: bool = True,
             precision: str = "double") -> MomentSums:
        """MomentSums of this partition at params (P,): gG (M, 1 + P) with the Jacobian, (M, 1)
        without; hh/nh/nn and loglik too when covariance=True (per clusters when clustered and the
        data have cluster ids). Complex params give complex sums (complex-step derivatives).

        precision="single": the Jacobian's GEMM runs in float32 on a float32 copy of dm made on
        first use (half of dm's bytes, see single_nbytes); for search directions only. The values
        stay float64; the final Jacobian (standard errors) must use "double", the default. Only
        the fast logit path has it; other paths ignore it."""
        params = np.asarray(params)
        if params.shape != (self.n_params,):
            raise ValueError(f"params must have shape ({self.n_params},), got {params.shape}")
        if precision not in ("double", "single"):
            raise ValueError(f"precision must be 'double' or 'single', got {precision!r}")
        if jacobian and self.derivatives == "fd":
            return self._fd_sums(params, covariance, clustered)
        d = self.data
        complex_step = np.iscomplexobj(params)
        dtype = np.complex128 if complex_step else np.float64
        fast = self.fast and not complex_step
        chunks = self.chunks if jacobian else [(0, 0)]
        single = fast and jacobian and not covariance and precision == "single"
        if single and self._dm_single is None:
            self._dm_single = d.dm.astype(np.float32)
        value_only = fast and not jacobian and not covariance
        keep = value_only and self._residual is not None
        if keep:
            self._residual_params = None

        if covariance:  # once per estimate: serial, since a cluster's sets may span tiles
            acc = np.zeros((d.M, 1 + len(params) * jacobian), dtype=dtype)
            units = UnitSums(d.M)
            cluster = d.cluster if clustered else None
            loglik = 0.0
            ws = self._workspaces[0]
            for i, tile in enumerate(self.tiles):
                X, dm = d.X[tile.rows], d.dm[tile.rows]
                chosen = self._chosen[i] if self._chosen is not None else None
                if fast:
                    ws.reset()
                    s, ll = logit_probabilities(X, params, tile.seg, ws, chosen)
                    H = logit_tile_sums(X, dm, s, tile.seg, ws, acc, jacobian, need_h=True)
                else:
                    H, ll = generic_tile_sums(self.model, params, X, dm, tile.seg, ws, acc, chunks, True, chosen)
                loglik += ll
                units.add_sets(H, None if cluster is None else cluster[tile.set_start : tile.set_stop])
            units.finish()
            return MomentSums(n_sets=d.n_sets, gG=acc, hh=units.hh, nh=units.nh, nn=units.nn,
                              n_units=units.n_units, loglik=loglik)

        def work(ws, tiles):
            acc = np.zeros((d.M, 1 + len(params) * jacobian), dtype=dtype)
            for tile in tiles:
                X, dm = d.X[tile.rows], d.dm[tile.rows]
                if fast:
                    ws.reset()
                    residual = self._residual[tile.rows] if keep else None
                    s, _ = logit_probabilities(X, params, tile.seg, ws, out=residual)
                    logit_tile_sums(X, dm, s, tile.seg, ws, acc, jacobian, need_h=False,
                                    dm_single=self._dm_single[tile.rows] if single else None)
                else:
                    generic_tile_sums(self.model, params, X, dm, tile.seg, ws, acc, chunks, False)
            return acc

        acc = sum(self._map(work, self.stripes if value_only else self.tiles))
        if keep:
            self._residual_params = params.copy()
        return MomentSums(n_sets=d.n_sets, gG=acc)

    def pullback(self, params, v) -> np.ndarray:
        """sum_i (dh_i/db)' v (P,) for v (M,): n G' v without forming G (reverse mode)."""
        params = np.asarray(params, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        if self.derivatives == "fd":
            return self._fd_sums(params, False, False).gG[:, 1:].T @ v
        d = self.data
        reverse = self.fast and self.derivatives == "adjoint"
        kept = reverse and self._residual_params is not None and np.array_equal(self._residual_params, params)

        def work(ws, tiles):
            acc = np.zeros(self.n_params)
            for tile in tiles:
                X, dm = d.X[tile.rows], d.dm[tile.rows]
                if reverse:
                    ws.reset()
                    s = self._residual[tile.rows] if kept else logit_probabilities(X, params, tile.seg, ws)[0]
                    logit_tile_pullback(X, dm, s, v, tile.seg, ws, acc)
                else:
                    generic_tile_pullback(self.model, params, X, dm, v, tile.seg, ws, acc, self.chunks)
            return acc

        return sum(self._map(work, self.stripes if reverse else self.tiles))

    def _fd_sums(self, params, covariance: bool, clustered: bool) -> MomentSums:
        """One-sided finite differences: P + 1 value evaluations, step sqrt(eps) max(1, |b_k|)."""
        base = self.sums(params, jacobian=False, covariance=covariance, clustered=clustered)
        columns = [base.gG[:, 0]]
        for k in range(self.n_params):
            h = np.sqrt(np.finfo(float).eps) * max(1.0, abs(float(params[k])))
            step = params.astype(np.float64, copy=True)
            step[k] += h
            columns.append((self.sums(step, jacobian=False).gG[:, 0] - base.gG[:, 0]) / (step[k] - params[k]))
        base.gG = np.column_stack(columns)
        return base
