"""Benchmark `estpipe load` on a long CSV: rows/s and peak RSS at several file sizes.

Writes long-format CSVs of 50,000 sets x 20 alternatives (1,000,000 rows) and of a quarter of
that (250,000 rows), with 4 x columns (K = M = 4; `--asc` adds 19 constants). Runs `estpipe load`
on each as a subprocess under `/usr/bin/time -v` (apt-get install -y time if it is missing) and
prints wall time, rows/s and peak RSS. Memory must not grow with the file: the peaks should be
about equal (only O(n_sets) arrays such as set ids and offsets grow).

    python scripts/bench_load.py [--sets 50000] [--alternatives 20] [--repeats 3] [--scales 0.25,1]
                                   [--folder /tmp/x] [--asc]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 4


def write_long_csv(path: Path, n_sets: int, n_alts: int, seed: int = 0) -> int:
    """Write n_sets x n_alts rows (set, alt, choice, x0..x3) in chunks; return the row count."""
    rng = np.random.default_rng(seed)
    sets_per_chunk = 5000
    with open(path, "w") as f:
        f.write("set,alt,choice," + ",".join(f"x{k}" for k in range(K)) + "\n")
        for s0 in range(0, n_sets, sets_per_chunk):
            n = min(sets_per_chunk, n_sets - s0)
            sid = np.repeat(np.arange(s0, s0 + n), n_alts)
            alt = np.tile(np.arange(1, n_alts + 1), n)
            choice = np.zeros(n * n_alts, dtype=np.int64)
            choice[np.arange(n) * n_alts + rng.integers(0, n_alts, n)] = 1
            table = np.column_stack([sid, alt, choice, rng.normal(size=(n * n_alts, K))])
            np.savetxt(f, table, fmt=["%d", "%d", "%d"] + ["%.6f"] * K, delimiter=",")
    return n_sets * n_alts


def timed_load(csv: Path, out: Path, asc: bool) -> tuple[float, float, float]:
    """(wall seconds, load seconds as estpipe reports them (no process start-up), peak RSS in MB)
    of one `estpipe load` subprocess."""
    estpipe = shutil.which("estpipe") or sys.exit("estpipe is not on PATH: pip install -e .")
    cmd = ["/usr/bin/time", "-v", estpipe, "load", str(csv), str(out), "--set-col", "set",
           "--choice-col", "choice", "--x", ",".join(f"x{k}" for k in range(K))]
    if asc:
        cmd += ["--alt-col", "alt", "--asc"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"estpipe load failed: {run.stderr}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    inside = float(re.search(r"rows read in ([0-9.]+) s", run.stdout).group(1))
    return wall, inside, kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=50_000)
    parser.add_argument("--alternatives", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--scales", default="0.25,1", help="file sizes as fractions of --sets, e.g. 0.25,1,4")
    parser.add_argument("--asc", action="store_true", help="also add one constant per alternative but the first")
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time is missing: apt-get install -y time")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench_load."))
    folder.mkdir(parents=True, exist_ok=True)
    scales = [float(v) for v in args.scales.split(",")]
    files = {}
    for scale in scales:
        n_sets = int(round(args.sets * scale))
        path = folder / f"long_{n_sets}x{args.alternatives}.csv"
        rows = write_long_csv(path, n_sets, args.alternatives)
        files[scale] = (path, rows)
        print(f"wrote {path}: {rows:,} rows, {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)

    # interleaved (small, large, small, large, ...) so every size sees the same machine load
    results = {scale: [] for scale in files}
    for _ in range(args.repeats):
        for scale, (path, _) in files.items():
            results[scale].append(timed_load(path, folder / "out.h5", args.asc))
    n_asc = args.alternatives - 1 if args.asc else 0
    print(f"estpipe load, {args.alternatives} alternatives per set, K = M = {K + n_asc} ({K} x + "
          f"{n_asc} constants), median of {args.repeats} runs:")
    print(f"{'rows':>12} {'MB csv':>8} {'wall s':>8} {'rows/s':>10} {'load s':>8} {'rows/s':>10} {'peak RSS MB':>12}")
    print(f"{'':>12} {'':>8} {'(process, with start-up)':>19} {'(as estpipe reports)':>20}")
    for scale, (path, rows) in files.items():
        wall, inside, peak = (statistics.median(r[i] for r in results[scale]) for i in range(3))
        print(f"{rows:>12,} {path.stat().st_size / 1e6:>8.1f} {wall:>8.2f} {rows / wall:>10,.0f} "
              f"{inside:>8.2f} {rows / inside:>10,.0f} {peak:>12.0f}")
    if args.folder is None:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
