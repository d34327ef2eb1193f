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
from estpipe.kernel.blas import blas_threads, restart_stale_openblas
from estpipe.kernel.blas import controller as _blas_controller
from estpipe.kernel.derivatives import DERIVATIVES
from estpipe.kernel.units import UnitSums
from estpipe.kernel.generic import generic_tile_pullback, generic_tile_sums
from estpipe.kernel.fused_logit import logit_probabilities, logit_tile_pullback, logit_tile_sums
from estpipe.kernel.sums import MomentSums
from estpipe.kernel.tiles import DEFAULT_TILE_ROWS, plan_tiles
from estpipe.models import get_model

STRIPE_FACTOR = 8


class PartitionKernel:
    """data: ChoiceData (X (n_rows, K), dm (n_rows, M), offsets, chosen, cluster), kept resident.

    fast: use the hand-fused logit path when the model is logit (tests turn it off to compare).
    chunk: partials per dual block (default: chunks.chunk_size's rule).
    threads: threads over tiles (default: the BLAS thread count)."""

    _pool_pid: int | None = None  # the process that started _pool

    def __init__(self, data: ChoiceData, model: str = "logit", derivatives: str = "dual",
                 tile_rows: int | None = None, fast: bool = True, chunk: int | None = None,
                 threads: int | None = None):
        DERIVATIVES.get(derivatives)
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
        self._absmax = None

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
        """MomentSums of this partition at params (P,): gG (M, 1 + P) with the Jacobian, (M, 1)
        without; hh/nh/nn and loglik too when covariance=True (per clusters when clustered and the
        data have cluster ids). Complex params give complex sums (complex-step derivatives).

        seed_scale: (P,) positive, default ones: the Jacobian columns are with respect to
        beta = seed_scale * params, i.e. dh/db divided by seed_scale (the dual seeds carry
        1 / seed_scale, so data in huge units never overflow the partials).
        moment_scale: (M,) positive R, default ones: hh and nh are sums of R h (MomentSums.S_scaled).
        fd_steps: (P,) finite-difference steps in the units of params (derivatives "fd");
        default sqrt(eps) max(1, |params_k|).

        precision="single": the Jacobian's GEMM runs in float32 on a float32 copy of dm made on
        first use (half of dm's bytes, see single_nbytes); for search directions only. The values
        stay float64; the final Jacobian (standard errors) must use "double", the default. Only
        the fast logit path has it; other paths ignore it."""
        params = np.asarray(params)
        if params.shape != (self.n_params,):
            raise ValueError(f"params must have shape ({self.n_params},), got {params.shape}")
        if precision not in ("double", "single"):
            raise ValueError(f"precision must be 'double' or 'single', got {precision!r}")
        seed_scale = None if seed_scale is None else np.asarray(seed_scale, dtype=np.float64)
        moment_scale = None if moment_scale is None else np.asarray(moment_scale, dtype=np.float64)
        if jacobian and self.derivatives == "fd":
            return self._fd_sums(params, covariance, clustered, seed_scale, moment_scale, fd_steps)
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
        inv_scale = None if seed_scale is None else 1.0 / seed_scale
        prescale = fast and jacobian and self._prescale(inv_scale)

        if covariance:  # once per estimate: serial, since a cluster's sets may span tiles
            acc = np.zeros((d.M, 1 + len(params) * jacobian), dtype=dtype)
            units = UnitSums(d.M, moment_scale)
            cluster = d.cluster if clustered else None
            loglik = 0.0
            ws = self._workspaces[0]
            for i, tile in enumerate(self.tiles):
                X, dm = d.X[tile.rows], d.dm[tile.rows]
                chosen = self._chosen[i] if self._chosen is not None else None
                if fast:
                    ws.reset()
                    s, ll = logit_probabilities(X, params, tile.seg, ws, chosen)
                    H = logit_tile_sums(X, dm, s, tile.seg, ws, acc, jacobian, need_h=True,
                                        inv_scale=inv_scale, prescale=prescale)
                else:
                    H, ll = generic_tile_sums(self.model, params, X, dm, tile.seg, ws, acc, chunks, True, chosen,
                                              seed_scale)
                loglik += ll
                units.add_sets(H, None if cluster is None else cluster[tile.set_start : tile.set_stop])
            units.finish()
            return MomentSums(n_sets=d.n_sets, gG=acc, hh=units.hh, nh=units.nh, nn=units.nn,
                              n_units=units.n_units, loglik=loglik, moment_scale=moment_scale)

        def work(ws, tiles):
            acc = np.zeros((d.M, 1 + len(params) * jacobian), dtype=dtype)
            for tile in tiles:
                X, dm = d.X[tile.rows], d.dm[tile.rows]
                if fast:
                    ws.reset()
                    residual = self._residual[tile.rows] if keep else None
                    s, _ = logit_probabilities(X, params, tile.seg, ws, out=residual)
                    logit_tile_sums(X, dm, s, tile.seg, ws, acc, jacobian, need_h=False,
                                    dm_single=self._dm_single[tile.rows] if single else None,
                                    inv_scale=inv_scale, prescale=prescale)
                else:
                    generic_tile_sums(self.model, params, X, dm, tile.seg, ws, acc, chunks, False,
                                      seed_scale=seed_scale)
            return acc

        acc = sum(self._map(work, self.stripes if value_only else self.tiles))
        if keep:
            self._residual_params = params.copy()
        return MomentSums(n_sets=d.n_sets, gG=acc, moment_scale=moment_scale)

    def pullback(self, params, v, seed_scale=None, fd_steps=None) -> np.ndarray:
        """sum_i (dh_i/dbeta)' v (P,) for v (M,): n G' v without forming G (reverse mode), with
        beta = seed_scale * params as in sums()."""
        params = np.asarray(params, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        seed_scale = None if seed_scale is None else np.asarray(seed_scale, dtype=np.float64)
        if self.derivatives == "fd":
            return self._fd_sums(params, False, False, seed_scale, None, fd_steps).gG[:, 1:].T @ v
        d = self.data
        reverse = self.fast and self.derivatives == "adjoint"
        kept = reverse and self._residual_params is not None and np.array_equal(self._residual_params, params)
        inv_scale = None if seed_scale is None else 1.0 / seed_scale
        prescale = reverse and self._prescale(inv_scale)

        def work(ws, tiles):
            acc = np.zeros(self.n_params)
            for tile in tiles:
                X, dm = d.X[tile.rows], d.dm[tile.rows]
                if reverse:
                    ws.reset()
                    s = self._residual[tile.rows] if kept else logit_probabilities(X, params, tile.seg, ws)[0]
                    logit_tile_pullback(X, dm, s, v, tile.seg, ws, acc, inv_scale, prescale)
                else:
                    generic_tile_pullback(self.model, params, X, dm, v, tile.seg, ws, acc, self.chunks, seed_scale)
            return acc

        return sum(self._map(work, self.stripes if reverse else self.tiles))

    def _fd_sums(self, params, covariance: bool, clustered: bool, seed_scale=None, moment_scale=None,
                 fd_steps=None) -> MomentSums:
        """One-sided finite differences: P + 1 value evaluations, steps fd_steps (P,) or
        sqrt(eps) max(1, |b_k|); columns divided by seed_scale like the dual ones."""
        base = self.sums(params, jacobian=False, covariance=covariance, clustered=clustered,
                         moment_scale=moment_scale)
        columns = [base.gG[:, 0]]
        for k in range(self.n_params):
            if fd_steps is not None:
                h = float(fd_steps[k])
            else:
                h = np.sqrt(np.finfo(float).eps) * max(1.0, abs(float(params[k])))
            step = params.astype(np.float64, copy=True)
            step[k] += h
            column = (self.sums(step, jacobian=False).gG[:, 0] - base.gG[:, 0]) / (step[k] - params[k])
            columns.append(column if seed_scale is None else column / seed_scale[k])
        base.gG = np.column_stack(columns)
        return base
