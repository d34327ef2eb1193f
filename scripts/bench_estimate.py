"""Benchmark `estpipe estimate` as a whole process (DESIGN.md's main job).

1. On 100,000 sets x 30 alternatives, K = 20, M = 40 (logit design, 1.44 GB): two-step wall time
   of `python -m estpipe estimate` as a whole process, its evaluations, and the peak of the PSS
   (also RSS, USS) summed over the process and all its children (client, scheduler, dask
   workers), sampled by scripts/bench_common.py; `--workers 1` and `--workers 2` interleaved, medians and the ratio; the dask
   overhead per evaluation over the kernel (from the results file's timing).
2. statsmodels' ConditionalLogit (method="newton") against estpipe on 20,000 sets, just-identified
   (M = K: z = x), once each, in this process: the ratio of fit times.

    python scripts/bench_estimate.py [--sets 100000] [--reps 1] [--skip-statsmodels] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_measured  # noqa: E402


def ensure_data(path: Path, sets: int, alternatives: int, K: int, M: int) -> None:
    if path.exists():
        return
    from estpipe.data.simulate import simulate_choice_data

    t0 = time.perf_counter()
    simulate_choice_data(path, sets=sets, alternatives=(alternatives, alternatives), params=K, moments=M, seed=0)
    print(f"made {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def bench_main(args) -> dict:
    data = Path(args.dir) / f"bench_{args.sets}x{args.alternatives}_K{args.params}_M{args.moments}.h5"
    ensure_data(data, args.sets, args.alternatives, args.params, args.moments)
    data_bytes = 8 * args.sets * args.alternatives * (args.params + args.moments)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.reps):
        for workers in (1, 2):
            out = Path(args.dir) / f"bench_results_w{workers}.json"
            cmd = [sys.executable, "-m", "estpipe", "estimate", str(data), "--workers", str(workers), "--out", str(out)]
            r = run_measured(cmd)
            if r.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            res = json.loads(out.read_text())
            m = dict(wall=r.wall, peak_pss=r.memory.pss, peak_rss=r.memory.rss, peak_uss=r.memory.uss,
                     evaluations=res["evaluations"], converged=res["converged"], timing=res["timing"],
                     inner_wall=res["wall_seconds"], blas=res["versions"]["blas"]["threads_per_worker"])
            runs[workers].append(m)
            print(f"rep {rep} workers {workers}: {m['wall']:.2f} s whole process, {m['evaluations']} evaluations, "
                  f"peak {m['peak_pss'] / 1e9:.2f} GB PSS ({m['peak_rss'] / 1e9:.2f} RSS, {m['peak_uss'] / 1e9:.2f} USS), overhead/eval "
                  f"{1e3 * m['timing']['overhead_per_evaluation_seconds']:.1f} ms", file=sys.stderr)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("wall", "peak_pss", "peak_rss", "peak_uss", "evaluations", "inner_wall")}
           for w, rs in runs.items()}
    return {
        "data": str(data), "data_bytes": data_bytes,
        "workers_1": med[1], "workers_2": med[2],
        "ratio_wall_w2_over_w1": med[2]["wall"] / med[1]["wall"],
        "peak_over_data_w1": med[1]["peak_pss"] / data_bytes,
        "peak_over_data_w2": med[2]["peak_pss"] / data_bytes,
        "dask_overhead_per_evaluation_ms": 1e3 * statistics.median(
            r["timing"]["overhead_per_evaluation_seconds"] for r in runs[2]),
        "runs": runs,
    }


def bench_statsmodels(args) -> dict:
    """ConditionalLogit(newton) vs estpipe on the same just-identified data, fit times."""
    from statsmodels.discrete.conditional_models import ConditionalLogit

    from estpipe.data.format import read_choice_data
    from estpipe.orchestration import EstimateOptions, estimate

    path = Path(args.dir) / f"bench_justid_{args.sm_sets}x{args.alternatives}_K{args.params}.h5"
    ensure_data(path, args.sm_sets, args.alternatives, args.params, args.params)
    t0 = time.perf_counter()
    r = estimate(path, EstimateOptions())
    t_estpipe = time.perf_counter() - t0
    d = read_choice_data(path)
    groups = np.repeat(np.arange(d.n_sets), np.diff(d.offsets))
    t0 = time.perf_counter()
    fit = ConditionalLogit(d.chosen.astype(float), d.X, groups=groups).fit(method="newton", disp=False, maxiter=100)
    t_sm = time.perf_counter() - t0
    return {"sets": args.sm_sets, "estpipe_seconds": t_estpipe, "statsmodels_seconds": t_sm,
            "ratio": t_sm / t_estpipe, "max_rel_diff_params": float(np.max(np.abs(r.params - fit.params) / np.abs(fit.params)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--sets", type=int, default=100_000)
    ap.add_argument("--alternatives", type=int, default=30)
    ap.add_argument("--params", type=int, default=20)
    ap.add_argument("--moments", type=int, default=40)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sm-sets", type=int, default=20_000)
    ap.add_argument("--skip-main", action="store_true")
    ap.add_argument("--skip-statsmodels", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = {}
    if not args.skip_main:
        out["estimate"] = bench_main(args)
    if not args.skip_statsmodels:
        out["statsmodels"] = bench_statsmodels(args)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    if "estimate" in out:
        e = out["estimate"]
        gb = e["data_bytes"] / 1e9
        for w in (1, 2):
            m = e[f"workers_{w}"]
            print(f"--workers {w}: {m['wall']:.2f} s whole process, {m['evaluations']:.0f} evaluations, "
                  f"peak PSS (all processes) {m['peak_pss'] / 1e9:.2f} GB = {m['peak_pss'] / e['data_bytes']:.2f}x data ({gb:.2f} GB; "
                  f"RSS {m['peak_rss'] / 1e9:.2f}, USS {m['peak_uss'] / 1e9:.2f})")
        print(f"--workers 2 / --workers 1 wall: {e['ratio_wall_w2_over_w1']:.2f}; dask overhead per evaluation "
              f"{e['dask_overhead_per_evaluation_ms']:.1f} ms")
    if "statsmodels" in out:
        s = out["statsmodels"]
        print(f"statsmodels ConditionalLogit (newton) {s['statsmodels_seconds']:.1f} s vs estpipe {s['estpipe_seconds']:.2f} s "
              f"on {s['sets']} sets: {s['ratio']:.0f}x (params agree to {s['max_rel_diff_params']:.1e})")


if __name__ == "__main__":
    main()
