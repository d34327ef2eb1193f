"""estpipe: GMM estimation of logit choice models on large data.

The derivatives of the moments come from forward-mode dual blocks whose heavy step is one BLAS
matrix product per tile (see docs/DESIGN.md).
"""

from __future__ import annotations

import os

# OpenBLAS's idle worker threads busy-wait about 2^28 cycles (~0.1 s) after every multi-threaded
# BLAS call before they sleep. The kernel runs its tiles on its own threads with BLAS held to one
# thread, so a worker still spinning from an earlier call (any numpy product outside the kernel)
# takes one of the cores away from the tile threads: measured on 2 cores, it used a whole core
# during the dual evaluations and the second tile thread gained nothing. 2^20 cycles (well under
# a millisecond) still covers back-to-back BLAS calls. OpenBLAS reads it when it loads: when
# estpipe is imported first (the CLI, and the dask workers, which inherit it). When numpy came
# first, the kernel makes OpenBLAS read it again before its first threaded tiles (kernel/blas.py).
# An explicit setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

__version__ = "0.1.0"

from estpipe.errors import UserError  # noqa: E402

__all__ = ["LogitMoments", "UserError", "__version__", "estimate", "from_frame", "logit_moments", "simulate"]


def __getattr__(name):
    # The kernel and the notebook API are imported lazily so that `estpipe --help` stays fast.
    if name in ("logit_moments", "LogitMoments"):
        import estpipe.kernel

        return getattr(estpipe.kernel, name)
    if name in ("from_frame", "estimate", "simulate"):
        import estpipe.notebook

        return getattr(estpipe.notebook, name)
    raise AttributeError(name)
