"""OpenBLAS's idle worker threads against the kernel's tile threads, whatever the import order.

OpenBLAS (its pthreads build, numpy's and scipy's wheels) reads OPENBLAS_THREAD_TIMEOUT when it
starts its worker threads, and an idle worker busy-waits 2^timeout cycles after each threaded
call (default 2^28, about 0.1 s). estpipe sets the variable to 20 on import (estpipe/__init__.py),
which is too late when the caller imported numpy first, as every user script does: then a worker
left spinning by the caller's own numpy product takes a core from the tile threads (measured on
2 cores at 1,000 sets x 30: the dual evaluation 5.5 ms instead of 3.3 ms).

What the library read is `openblas_thread_timeout()`. When it differs from the environment,
`openblas_read_env()` makes OpenBLAS read the environment again and `blas_thread_shutdown_()`
stops its workers; OpenBLAS starts them again on its next threaded call (threadpoolctl's limit
around the tiles, or any numpy product), now with the short timeout. OpenBLAS itself runs the same
shutdown before every fork (its pthread_atfork handler), and restarts lazily in the child. Each
library is checked once per process, in the thread that runs the kernel; a BLAS call running on
another thread at that very moment would race with the shutdown, so a program that calls BLAS
from several threads can turn this off with ESTPIPE_OPENBLAS_RESTART=0.

Nothing happens when the timeout was read correctly (estpipe imported first: the CLI, and dask
workers, which inherit the variable), for OpenBLAS built with OpenMP (its threads are OpenMP's),
when a symbol is missing, or for other BLAS libraries (MKL, BLIS).

This module is also where estpipe asks about its BLAS: `controller()` (the one threadpoolctl
controller the kernel limits threads with), `blas_threads()` and `blas_libraries()` (what the
results file, `estpipe bench` and the workers' reports show).
"""

from __future__ import annotations

import ctypes
import os

RESTART_ENV = "ESTPIPE_OPENBLAS_RESTART"
_SYMBOLS = ("openblas_thread_timeout", "openblas_read_env", "blas_thread_shutdown_")

# OpenBLAS libraries (by file path) checked in this process, and those whose threads were restarted.
_checked: set[str] = set()
restarted: list[str] = []
_CONTROLLER = None


def controller():
    """This process's threadpoolctl ThreadpoolController, made once: making one scans the loaded
    libraries (milliseconds), too slow for every evaluation."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def blas_threads() -> int:
    """The largest thread count among the BLAS libraries loaded (1 when none is found)."""
    return max([lib.num_threads for lib in controller().select(user_api="blas").lib_controllers] or [1])


BLAS_FIELDS = ("internal_api", "version", "num_threads", "prefix", "architecture")


def blas_libraries() -> list[dict]:
    """The BLAS libraries loaded in this process now, with their thread counts: one dict per
    library with threadpoolctl's BLAS_FIELDS. A fresh scan, unlike `controller()`, so a library
    loaded later (scipy's OpenBLAS) and a limit set since (a dask worker's) are seen."""
    from threadpoolctl import threadpool_info

    return [{k: info.get(k) for k in BLAS_FIELDS} for info in threadpool_info() if info.get("user_api") == "blas"]


def restart_stale_openblas(controller) -> list[str]:
    """Restart the worker threads of every OpenBLAS in `controller` (a threadpoolctl
    ThreadpoolController) that read another OPENBLAS_THREAD_TIMEOUT than the environment's now;
    each library once per process. Returns the file paths restarted by this call."""
    if os.environ.get(RESTART_ENV, "1") == "0":
        return []
    libs = [lib for lib in controller.lib_controllers if lib.internal_api == "openblas" and lib.filepath not in _checked]
    if not libs:
        return []
    try:
        wanted = int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", ""))
    except ValueError:  # unset, or a value OpenBLAS would read as 0 (its default) too
        wanted = 0
    done = []
    for lib in libs:
        _checked.add(lib.filepath)
        if getattr(lib, "threading_layer", None) != "pthreads":
            continue
        timeout, read_env, shutdown = (getattr(lib.dynlib, name, None) for name in _SYMBOLS)
        if timeout is None or read_env is None or shutdown is None:
            continue
        timeout.restype = ctypes.c_uint
        if wanted <= 0 or timeout() == wanted:
            continue
        read_env()
        shutdown()
        done.append(lib.filepath)
    restarted.extend(done)
    return done


# -- glibc's heap: keep freed memory for the next evaluation ------------------------------------------
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed on 64-bit
TRIM_THRESHOLD = 512 * 2**20
_heap_kept = False


def keep_freed_memory() -> bool:
    """Let glibc serve allocations of up to 32 MiB from its heap and keep up to 512 MiB freed
    there, instead of mapping each large numpy temporary afresh (and faulting its pages in, zeroed,
    on first touch) and unmapping it when freed. A kernel's evaluation makes the same temporaries
    every time (the simulated likelihood some 8 MB each per tile and batch of draws): measured at
    4,000 sets x 3 x 1,000 draws, 0.12-0.18 s per evaluation against 0.072-0.075 s with the heap
    kept (interleaved, 2 runs each). Once per process; True when glibc took it (False elsewhere)."""
    global _heap_kept
    if _heap_kept:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _heap_kept = ok
    return ok
