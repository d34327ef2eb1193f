"""Iterations, evaluations (map/reduces) and wall time of each MLE optimizer (issue 11).

    PYTHONPATH=pipeline python3 scripts/bench_mle_optimizers.py [WORKDIR]

With PYTHONPATH at a tree without MLE_OPTIMIZERS (main before issue 11's optimizers) it times
that tree's one path, the "before" column of DESIGN.md's table.

Data: the modechoice logit (data/modechoice.csv), a simulated nested logit (20,000 sets x 7
alternatives, 3 nests), a simulated logit (20,000 sets x 30) and a simulated mixed logit by
simulated likelihood (4,000 sets x 3, K = 10 with 3 normal random coefficients, 1,000 Halton
draws). In-process, one run each."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:
    from estpipe.estimation.mle import MLE_OPTIMIZERS
    NAMES = MLE_OPTIMIZERS.names
except ImportError:  # a tree before issue 11's optimizers (the "before" column): its one path
    NAMES = (None,)
from estpipe.orchestration import EstimateOptions, estimate

REPO = Path(__file__).resolve().parents[1]
NESTS = "n1=a1,a2; n2=a3,a4; n3=a5,a6,a7"


def run(*args):
    subprocess.run([sys.executable, "-m", "estpipe", *map(str, args)], check=True, capture_output=True)


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    mc, nl, lg, mx = work / "mc.h5", work / "nl.h5", work / "logit.h5", work / "mixed.h5"
    if not mc.exists():
        run("load", REPO / "data" / "modechoice.csv", mc, "--set-col", "individual", "--choice-col", "choice",
            "--x", "invc,invt,ttme", "--alt-col", "mode", "--asc")
    if not nl.exists():
        run("simulate", nl, "--design", "nested-logit", "--sets", 20000, "--alternatives", 7, "--params", 3,
            "--moments", 12, "--nests", 3)
    if not lg.exists():
        run("simulate", lg, "--sets", 20000, "--alternatives", 30)
    if not mx.exists():  # the xlogit timing table's size (scripts/bench_peers_mle.py)
        run("simulate", mx, "--design", "mixed-logit", "--sets", 4000, "--alternatives", 3, "--params", 10,
            "--moments", 30, "--random", "x1,x2,x3", "--seed", 2)
    cases = [("modechoice logit", mc, {}), ("nested logit 20000x7", nl, {"model": "nested-logit", "nests": NESTS}),
             ("logit 20000x30", lg, {}),
             ("mixed logit 4000x3, 3 random, 1000 Halton draws", mx,
              {"model": "mixed-logit", "random": "x1,x2,x3", "draws": 1000, "draws_kind": "halton"})]
    print("| data | optimizer | iterations | evaluations (the step message) | seconds | loglik |")
    print("|---|---|---|---|---|---|")
    for label, path, extra in cases:
        ref = None
        for name in NAMES:
            t0 = time.perf_counter()
            r = estimate(path, EstimateOptions(estimator="mle", **({"optimizer": name} if name else {}), **extra))
            sec = time.perf_counter() - t0
            d = r.to_dict()
            step = d["steps"][0]
            ref = r.params if ref is None else ref
            msg = step["message"].replace("|", "")
            print(f"| {label} | {name} | {step['iterations']} | total {step['evaluations']} ({msg}) | {sec:.2f} | "
                  f"{r.loglik:.6f} |  max|b-b_bfgs| {np.max(np.abs(r.params - ref)):.1e} conv {r.converged}",
                  flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/bench_mle_optimizers"))
