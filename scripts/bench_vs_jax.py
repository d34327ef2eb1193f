"""Two-step GMM as a whole process: estpipe against a JAX pipeline, measured in one run.

The JAX pipeline is the comparison issue 4 names: read the same HDF5 file into memory, moments
g(b) under jit, their Jacobian by jit(jacfwd), scipy least_squares on L'g for W = I and then for
W = S(b1)^-1. It assumes equal set sizes (the simulated logit design). Both run as separate
processes, interleaved (estpipe --workers 1, --workers 2, ..., JAX; repeated); peak memory is the
peak of the summed PSS of each process tree (RSS and USS too), sampled every 50 ms by
scripts/bench_common.py. The table gives medians and the ratios to JAX.

    python scripts/bench_vs_jax.py DATA.h5 [--workers 1 2] [--repeat 3] [--json runs.json]

JAX is not a dependency of estpipe: `pip install jax` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import gb, run_measured  # noqa: E402

JAX_PIPELINE = r'''
import json, sys, time
import h5py, numpy as np, scipy.optimize as so
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp

path = sys.argv[1]
t0 = time.perf_counter()
with h5py.File(path, "r") as f:
    off = f["offsets"][...]
    sizes = np.diff(off)
    J = int(sizes[0]); assert (sizes == J).all(), "the JAX pipeline needs equal set sizes"
    n = len(sizes)
    X = jnp.asarray(f["X"][...].reshape(n, J, -1))
    dm = jnp.asarray(f["dm"][...].reshape(n, J, -1))
K, M = X.shape[2], dm.shape[2]

def shares(b):
    return jax.nn.softmax(X @ b, axis=1)

@jax.jit
def moments(b):
    return jnp.einsum("njm,nj->m", dm, shares(b)) / n

jac = jax.jit(jax.jacfwd(moments))

@jax.jit
def covariance(b):
    h = jnp.einsum("njm,nj->nm", dm, shares(b))
    c = h - h.mean(axis=0)
    return c.T @ c / n

evals = 0
def fit(L, b0):
    global evals
    def res(b):
        global evals
        evals += 1
        return np.asarray(L.T @ moments(b))
    def jacf(b):
        return np.asarray(L.T @ jac(b))
    return so.least_squares(res, b0, jac=jacf, xtol=1e-10, ftol=1e-10, gtol=1e-12, max_nfev=200)

r1 = fit(np.eye(M), np.zeros(K))
S = np.asarray(covariance(r1.x))
L = np.linalg.cholesky(np.linalg.inv(S))
r2 = fit(L, r1.x)
print(json.dumps({"params": r2.x.tolist(), "evaluations": evals, "seconds": time.perf_counter() - t0,
                  "converged": bool(r1.success and r2.success)}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="estpipe --workers values to run (e.g. 1 2)")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the runs this many times")
    ap.add_argument("--json", help="also write every run's figures here")
    args = ap.parse_args()
    size = os.path.getsize(args.data)
    names = [f"estpipe w{w}" for w in args.workers] + ["jax"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "jax_pipeline.py")
        with open(script, "w") as fh:
            fh.write(JAX_PIPELINE)
        for rep in range(args.repeat):
            for name in names:
                if name == "jax":
                    m = run_measured([sys.executable, script, args.data])
                    res = json.loads(m.stdout.strip().splitlines()[-1]) if m.returncode == 0 else {}
                else:
                    out = os.path.join(tmp, "r.json")
                    m = run_measured([sys.executable, "-m", "estpipe", "estimate", args.data, "--workers",
                                      name.split("w")[-1], "--out", out])
                    res = json.load(open(out)) if m.returncode in (0, 3) else {}
                    os.path.exists(out) and os.unlink(out)
                if m.returncode not in (0, 3):
                    print(f"{name} failed ({m.returncode}): {m.stderr[-2000:]}", file=sys.stderr)
                row = {"wall": m.wall, "rss": m.memory.rss, "pss": m.memory.pss, "uss": m.memory.uss,
                       "evaluations": res.get("evaluations"), "params": res.get("params"),
                       "overhead_ms": 1e3 * res["timing"]["overhead_per_evaluation_seconds"] if "timing" in res else None}
                runs[name].append(row)
                print(f"rep {rep} {name}: {m.wall:.2f} s, peak {gb(m.memory.pss)} GB PSS / {gb(m.memory.rss)} RSS / "
                      f"{gb(m.memory.uss)} USS, {row['evaluations']} evaluations", file=sys.stderr, flush=True)

    def med(name, key):
        vals = [r[key] for r in runs[name] if r[key] is not None]
        return statistics.median(vals) if vals else float("nan")

    jax_wall = med("jax", "wall")
    print(f"data: {args.data} ({gb(size)} GB on disk); medians of {args.repeat} interleaved run(s); memory: peak of the "
          "sum over all processes (PSS: shared pages split between processes; RSS and USS bracket it)")
    print(f"{'pipeline':>12} {'wall s':>7} {'/ jax':>6} {'evals':>6} {'PSS GB':>7} {'RSS GB':>7} {'USS GB':>7} "
          f"{'/ data':>6} {'dask ovh ms':>11} {'max |db| vs jax':>15}")
    jax_params = runs["jax"][-1]["params"] if runs["jax"] else None
    for name in names:
        diff = float("nan")
        if name != "jax" and jax_params and runs[name][-1]["params"]:
            diff = max(abs(a - b) for a, b in zip(runs[name][-1]["params"], jax_params))
        ovh = med(name, "overhead_ms") if name.startswith("estpipe w") and not name.endswith("w1") else float("nan")
        print(f"{name:>12} {med(name, 'wall'):>7.2f} {med(name, 'wall') / jax_wall:>6.2f} {med(name, 'evaluations'):>6.0f} "
              f"{gb(med(name, 'pss')):>7} {gb(med(name, 'rss')):>7} {gb(med(name, 'uss')):>7} "
              f"{med(name, 'pss') / size:>6.2f} {ovh:>11.1f} {diff:>15.2e}")
    if "estpipe w1" in runs and "estpipe w2" in runs:
        ratios = [b["wall"] / a["wall"] for a, b in zip(runs["estpipe w1"], runs["estpipe w2"])]
        print(f"--workers 2 / --workers 1 wall: median {statistics.median(ratios):.2f} (per repetition: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"data": args.data, "data_bytes": size, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
