"""The time to write the HTML report of a 20-parameter two-step GMM result (issue 12's target:
at most 2 s as a whole `estpipe report` process, matplotlib's import included).

    python3 scripts/bench_report.py [--runs 5] [--work /tmp/bench-report]

Simulates 1,000 sets x 30 alternatives (K = 20, M = 40), estimates it (two steps), then times
`python3 -m estpipe report results.json` as whole processes, interleaved with the bare costs a
process pays before drawing anything (the interpreter with numpy, and the import of
matplotlib.pyplot), so that one run gives their ratios on this shared machine. Prints medians."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", default="/tmp/bench-report")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    est = [sys.executable, "-m", "estpipe"]
    subprocess.run([*est, "simulate", str(work / "d.h5"), "--sets", "1000", "--seed", "1"], check=True,
                   capture_output=True)
    subprocess.run([*est, "estimate", str(work / "d.h5"), "--out", str(work / "r.json")], check=True,
                   capture_output=True)
    times: dict[str, list[float]] = {"report": [], "python + numpy": [], "python + matplotlib.pyplot": []}
    for _ in range(a.runs):
        times["report"].append(timed([*est, "report", str(work / "r.json"), "--out", str(work / "r.html")]))
        times["python + numpy"].append(timed([sys.executable, "-c", "import numpy"]))
        times["python + matplotlib.pyplot"].append(
            timed([sys.executable, "-c", "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:28s} median {med[k]:.2f} s  ({', '.join(f'{x:.2f}' for x in v)})")
    print(f"drawing and writing (report - python + pyplot): {med['report'] - med['python + matplotlib.pyplot']:.2f} s; "
          f"target: report <= 2 s -> {'met' if med['report'] <= 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
