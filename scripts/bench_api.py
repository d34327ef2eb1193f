"""The Python API against the kernel and plain numpy, as a user script calls it (issue 8, item 7).

A user script imports numpy before estpipe and makes its own multi-threaded BLAS calls between
evaluations. So this script imports numpy first (unless --estpipe-first), and before every timed
call it makes a threaded BLAS product (a --blas-size square matmul). It times, interleaved in one
process (f, kernel, one-shot, reusable, f, ...):

- f: the plain-numpy evaluation of estpipe/bench.py (plain_objective);
- kernel: PartitionKernel.sums(b), value + Jacobian by dual blocks (the `estpipe bench` dual row);
- one-shot: estpipe.logit_moments(b, X, dm, offsets), value + Jacobian;
- reusable: estpipe.LogitMoments(X, dm, offsets) built once, then moments(b);
- with --extra, kernel-blas: the kernel on one tile thread, BLAS's own threads in its products;
  and gemm: dm' @ [s | ds/db] alone, all rows, BLAS threads (`estpipe bench`'s gemm row, the floor).

and prints medians and ratios. Without --child it runs itself once per size, import order and
OpenBLAS restart setting (on: the default; off: ESTPIPE_OPENBLAS_RESTART=0, the behaviour before
kernel/blas.py), each in a fresh process, and prints one table:

    python scripts/bench_api.py                          # 1,000 x 30, K = 20, M = 40
    python scripts/bench_api.py --sets 1000 20000 --repeat 40 --json api.json
    python scripts/bench_api.py --compare before=/path/to/old/checkout/pipeline   # before/after
"""

from __future__ import annotations

import os
import sys

# Before numpy: what the caller set (the children get exactly that, not estpipe's default).
_USER_TIMEOUT = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
if "--estpipe-first" in sys.argv:
    import estpipe  # noqa: F401

import numpy as np  # noqa: E402  (first, as in a user script, unless --estpipe-first)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import estpipe  # noqa: E402
from estpipe.bench import plain_objective, seed_design  # noqa: E402
from estpipe.kernel.engine import PartitionKernel, _blas_controller  # noqa: E402

try:  # an estpipe from before the reusable API (PYTHONPATH=<old checkout>/pipeline): its figures
    from estpipe.kernel import blas  # noqa: E402
except ImportError:
    blas = None
RESTART_ENV = "ESTPIPE_OPENBLAS_RESTART"

ROWS = ("f", "kernel", "one-shot", "reusable")


def openblas_timeouts() -> list[int]:
    """OPENBLAS_THREAD_TIMEOUT as each loaded OpenBLAS read it (0: unset, OpenBLAS's 2^28 cycles)."""
    out = []
    for lib in _blas_controller().lib_controllers:
        fn = getattr(lib.dynlib, "openblas_thread_timeout", None) if lib.internal_api == "openblas" else None
        out.append(int(fn()) if fn is not None else -1)
    return out


def measure(sets: int, alternatives: int, params: int, moments: int, repeat: int, blas_size: int, extra: bool) -> dict:
    data, b = seed_design(sets, alternatives, params, moments)
    X, dm, offsets = data.X, data.dm, data.offsets
    A = np.random.default_rng(1).standard_normal((blas_size, blas_size))
    timeout_at_start = openblas_timeouts()
    kernel = PartitionKernel(data)
    calls = {
        "f": lambda: plain_objective(b, X, dm, sets, alternatives),
        "kernel": lambda: kernel.sums(b),
        "one-shot": lambda: estpipe.logit_moments(b, X, dm, offsets),
    }
    reusable = estpipe.LogitMoments(X, dm, offsets) if blas is not None else None
    if reusable is not None:
        calls["reusable"] = lambda: reusable(b)
    if extra:
        single = PartitionKernel(data, threads=1)
        calls["kernel-blas"] = lambda: single.sums(b)
        # `estpipe bench`'s gemm row: the one product every dual evaluation needs, its floor.
        block, out = np.column_stack([np.full(len(X), 1.0 / alternatives), X]), np.empty((moments, 1 + params))
        calls["gemm"] = lambda: np.dot(dm.T, block, out=out)
    for fn in calls.values():  # warm-up: buffers, thread pools, the OpenBLAS restart if any
        A @ A
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            A @ A  # the caller's own threaded BLAS call: its workers idle (or spin) afterwards
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    g1, G1 = estpipe.logit_moments(b, X, dm, offsets)
    g, G = reusable(b) if reusable is not None else (g1, G1)
    if reusable is not None:
        reusable.close()
        kernel.close()
    medians = {name: float(np.median(t)) for name, t in times.items()}
    from threadpoolctl import threadpool_info

    return {
        "sets": sets, "alternatives": alternatives, "params": params, "moments": moments, "repeat": repeat,
        "blas_size": blas_size, "estpipe_first": "--estpipe-first" in sys.argv,
        "restart": blas is not None and os.environ.get(RESTART_ENV, "1") != "0",
        "estpipe": os.path.dirname(estpipe.__file__), "api": blas is not None,
        "openblas_timeout_at_start": timeout_at_start, "openblas_timeout_at_end": openblas_timeouts(),
        "restarted": list(blas.restarted) if blas is not None else [], "threads": kernel.threads,
        "blas": [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer", "architecture")}
                 for i in threadpool_info() if i.get("user_api") == "blas"],
        "median_ms": {k: 1e3 * v for k, v in medians.items()},
        "same_results": bool(np.array_equal(g, g1) and np.array_equal(G, G1)),
    }


def child_env(restart: bool, pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", RESTART_ENV)}
    if _USER_TIMEOUT is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = _USER_TIMEOUT
    if not restart:
        env[RESTART_ENV] = "0"
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def table(runs: list[dict]) -> str:
    def ms(m, k):
        return f"{m[k]:.2f}" if k in m else "-"

    def ratio(m, a, b):
        return f"{m[a] / m[b]:.2f}" if a in m and b in m else "-"

    head = (f"{'estpipe':<8} {'sets x J':>10} {'first':>7} {'restart':>7} | {'f ms':>6} {'kernel':>7} {'one-shot':>8} "
            f"{'reusable':>8} | {'kern/f':>6} {'1shot/k':>7} {'reus/k':>6} {'1shot/f':>7} {'reus/f':>6} | timeout read")
    lines = [head, "-" * len(head)]
    for r in runs:
        m = r["median_ms"]
        extra = (f"  kernel-blas {m['kernel-blas']:.2f} ms, gemm {m['gemm']:.2f} ms ({m['gemm'] / m['f']:.2f} x f)"
                 if "kernel-blas" in m else "")
        lines.append(
            f"{r['label']:<8} {r['sets']:>6} x {r['alternatives']:<2} {'estpipe' if r['estpipe_first'] else 'numpy':>7} "
            f"{('on' if r['restart'] else 'off') if r['api'] else '-':>7} | {ms(m, 'f'):>6} {ms(m, 'kernel'):>7} "
            f"{ms(m, 'one-shot'):>8} {ms(m, 'reusable'):>8} | {ratio(m, 'kernel', 'f'):>6} "
            f"{ratio(m, 'one-shot', 'kernel'):>7} {ratio(m, 'reusable', 'kernel'):>6} {ratio(m, 'one-shot', 'f'):>7} "
            f"{ratio(m, 'reusable', 'f'):>6} | {r['openblas_timeout_at_start']} -> {r['openblas_timeout_at_end']}{extra}")
    blas_info = runs[0]["blas"] if runs else []
    lines.append("BLAS: " + ", ".join(f"{b['internal_api']} {b['version']} ({b['num_threads']} threads, "
                                      f"{b['threading_layer']}, {b['architecture']})" for b in blas_info))
    lines.append(f"medians of {runs[0]['repeat'] if runs else 0} interleaved calls, each after a "
                 f"{runs[0]['blas_size'] if runs else 0}^2 threaded matmul; timeout read 0 = OpenBLAS's default 2^28 cycles")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, nargs="+", default=[1000])
    ap.add_argument("--alternatives", type=int, default=30)
    ap.add_argument("--params", type=int, default=20)
    ap.add_argument("--moments", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--blas-size", type=int, default=1000, help="side of the matmul before every timed call")
    ap.add_argument("--orders", nargs="+", choices=("numpy", "estpipe"), default=["numpy", "estpipe"],
                    help="which library the child imports first")
    ap.add_argument("--restart", nargs="+", choices=("on", "off"), default=["off", "on"],
                    help="off: ESTPIPE_OPENBLAS_RESTART=0, as before kernel/blas.py")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR",
                    help="also run the children on the estpipe under DIR (its source root, e.g. an old "
                         "checkout's pipeline/), labelled LABEL; repeatable")
    ap.add_argument("--extra", action="store_true", help="also time kernel-blas and gemm (see above)")
    ap.add_argument("--json", help="write all runs here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--estpipe-first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.sets[0], args.alternatives, args.params, args.moments, args.repeat,
                                 args.blas_size, args.extra)))
        return 0
    versions = [("this", os.environ.get("PYTHONPATH"))] + [tuple(c.split("=", 1)) for c in args.compare]
    runs = []
    for sets in args.sets:
        for label, pythonpath in versions:
            for order in args.orders:
                for restart in args.restart if label == "this" else ["off"]:
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--sets", str(sets),
                           "--alternatives", str(args.alternatives), "--params", str(args.params),
                           "--moments", str(args.moments), "--repeat", str(args.repeat), "--blas-size", str(args.blas_size)]
                    cmd += ["--estpipe-first"] * (order == "estpipe") + ["--extra"] * args.extra
                    out = subprocess.run(cmd, env=child_env(restart == "on", pythonpath), capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.stderr.write(out.stderr)
                        return out.returncode
                    runs.append({"label": label, **json.loads(out.stdout)})
                    print(f"done: {label}, {sets} sets, {order} first, restart {restart}", file=sys.stderr)
    print(table(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
