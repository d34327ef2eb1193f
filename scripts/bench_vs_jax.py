"""Two-step GMM as a whole process: estpipe against a JAX pipeline, measured in one run.

The JAX pipeline is the comparison issue 4 names: read the same HDF5 file into memory, moments
g(b) under jit, their Jacobian by jit(jacfwd), scipy least_squares on L'g for W = I and then for
W = S(b1)^-1. It assumes equal set sizes (the simulated logit design). Both run as separate
processes; peak memory is the peak of the summed RSS of the process tree, sampled every 50 ms.

    python scripts/bench_vs_jax.py DATA.h5 [--workers 1] [--repeat 1]

JAX is not a dependency of estpipe: `pip install jax` first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def run_measured(cmd: list[str], env=None) -> dict:
    """Run cmd; return wall seconds, peak summed RSS of it and its children (bytes), exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    return {"cmd": " ".join(cmd), "wall_seconds": wall, "peak_rss_bytes": peak, "returncode": proc.returncode,
            "stdout": out, "stderr_tail": err[-2000:]}


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
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two this many times")
    args = ap.parse_args()
    size = os.path.getsize(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "jax_pipeline.py")
        with open(script, "w") as fh:
            fh.write(JAX_PIPELINE)
        rows = []
        for _ in range(args.repeat):
            est = run_measured([sys.executable, "-m", "estpipe", "estimate", args.data, "--workers", str(args.workers),
                                "--out", os.path.join(tmp, "r.json")])
            res = json.load(open(os.path.join(tmp, "r.json"))) if est["returncode"] in (0, 3) else {}
            jx = run_measured([sys.executable, script, args.data])
            jres = json.loads(jx["stdout"].strip().splitlines()[-1]) if jx["returncode"] == 0 else {}
            rows.append((est, res, jx, jres))
    print(f"data: {args.data} ({size / 1e9:.2f} GB on disk)")
    print(f"{'run':>4} {'estpipe s':>10} {'jax s':>8} {'ratio':>6} {'estpipe GB':>11} {'jax GB':>7} {'est evals':>9} {'jax evals':>9} {'max |db|':>9}")
    for i, (est, res, jx, jres) in enumerate(rows):
        diff = max(abs(a - b) for a, b in zip(res.get("params", [0]), jres.get("params", [0]))) if res and jres else float("nan")
        print(f"{i:>4} {est['wall_seconds']:>10.2f} {jx['wall_seconds']:>8.2f} {est['wall_seconds'] / jx['wall_seconds']:>6.2f} "
              f"{est['peak_rss_bytes'] / 1e9:>11.2f} {jx['peak_rss_bytes'] / 1e9:>7.2f} {res.get('evaluations', '?'):>9} "
              f"{jres.get('evaluations', '?'):>9} {diff:>9.2e}")
        for name, r in (("estpipe", est), ("jax", jx)):
            if r["returncode"] not in (0, 3):
                print(f"{name} failed ({r['returncode']}): {r['stderr_tail']}", file=sys.stderr)


if __name__ == "__main__":
    main()
