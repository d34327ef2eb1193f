"""Benchmark `estpipe simulate` against plain h5py writing arrays of the same shapes from memory.

    python scripts/bench_simulate.py                      # 100,000 sets x 30, K=20, M=40, logit
    python scripts/bench_simulate.py --sets 20000 --repeats 5 --design seed

Each repeat runs, interleaved (the machines are shared and noisy):
- A: `estpipe simulate` as a subprocess under `/usr/bin/time -v` (peak RSS, CPU seconds); its own
  timing (the summary line on stderr) and the whole process's wall time.
- B: in a subprocess, h5py writing X (rows, K), dm (rows, M), chosen (rows,) and offsets, made
  in memory beforehand (not timed), in 16,384-row chunks, no compression, to a file in the same
  folder. Only the write is timed (wall and CPU seconds); it is done twice, since the first
  write of freshly made arrays in a process was measured 2-4x slower than a repeat (kernel time).
The page cache is flushed (sync) before each timed write and every file is deleted afterwards.
Prints medians and the ratio A / B; `--json` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK_ROWS = 16384


def run_simulate(out: Path, args) -> dict:
    cmd = [
        sys.executable, "-m", "estpipe", "simulate", str(out), "--design", args.design, "--sets", str(args.sets),
        "--alternatives", args.alternatives, "--params", str(args.params), "--moments", str(args.moments), "--seed", "0",
    ]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else None
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run((timer or []) + cmd, capture_output=True, text=True)
    process_wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"estpipe simulate failed ({proc.returncode}):\n{proc.stderr}")
    line = next(x for x in proc.stderr.splitlines() if x.startswith("estpipe: wrote"))
    seconds = float(re.search(r" in ([0-9.]+) s\b", line).group(1))
    own_cpu = float(re.search(r"\(CPU ([0-9.]+) s\)", line).group(1))
    mb = float(re.search(r", ([0-9,.]+) MB in", line).group(1).replace(",", ""))
    result = {"seconds": seconds, "own_cpu_seconds": own_cpu, "process_wall": process_wall, "MB": mb, "file_bytes": out.stat().st_size}
    if timer:
        def field(name):
            return re.search(rf"{re.escape(name)}: ([0-9.]+)", proc.stderr).group(1)

        result["peak_rss_MB"] = int(field("Maximum resident set size (kbytes)")) / 1024
        result["cpu_seconds"] = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    else:
        result["peak_rss_MB"] = result["cpu_seconds"] = None
    out.unlink()
    return result


def plain_arrays(rows: int, K: int, M: int, sets: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    offsets = np.linspace(0, rows, sets + 1).astype(np.int64)
    return {
        "X": rng.standard_normal((rows, K)),
        "dm": rng.standard_normal((rows, M)),
        "chosen": np.zeros(rows, dtype=np.int8),
        "offsets": offsets,
    }


def plain_write(out: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Time h5py writing the arrays (no compression, 16,384-row chunks); wall and CPU seconds."""
    import h5py

    os.sync()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with h5py.File(out, "w") as f:
        rows = len(arrays["X"])
        for name in ("X", "dm", "chosen"):
            a = arrays[name]
            ds = f.create_dataset(name, a.shape, dtype=a.dtype, chunks=(CHUNK_ROWS,) + a.shape[1:])
            for r in range(0, rows, CHUNK_ROWS):
                ds[r : r + CHUNK_ROWS] = a[r : r + CHUNK_ROWS]
        f.create_dataset("offsets", data=arrays["offsets"])
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "file_bytes": out.stat().st_size}


def run_plain(out: Path, args) -> dict:
    """The plain write in its own process, like simulate's (this process stays small and idle)."""
    cmd = [sys.executable, __file__, "--plain-worker", str(out), "--sets", str(args.sets), "--alternatives", args.alternatives,
           "--params", str(args.params), "--moments", str(args.moments)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"plain h5py write failed:\n{proc.stderr}")
    out.unlink()
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=int, default=100_000)
    p.add_argument("--alternatives", default="30", help="a fixed size (the plain write needs one); e.g. 30")
    p.add_argument("--params", type=int, default=20)
    p.add_argument("--moments", type=int, default=40)
    p.add_argument("--design", default="logit", choices=["logit", "seed"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="folder for the files (default: a new folder under /tmp)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    J = int(args.alternatives)
    rows = args.sets * J
    if args.plain_worker:
        # The first write of freshly made arrays in a process measured 2-4x slower than a
        # repeat (kernel time); report both.
        arrays = plain_arrays(rows, args.params, args.moments, args.sets)
        out = Path(args.plain_worker)
        first = plain_write(out, arrays)
        out.unlink()
        repeat = plain_write(out, arrays)
        print(json.dumps({"seconds": first["seconds"], "cpu_seconds": first["cpu_seconds"],
                          "repeat_seconds": repeat["seconds"], "repeat_cpu_seconds": repeat["cpu_seconds"],
                          "file_bytes": repeat["file_bytes"]}))
        return
    folder = Path(tempfile.mkdtemp(prefix="bench_simulate_", dir=args.dir))
    try:
        sim, plain = [], []
        for _ in range(args.repeats):
            sim.append(run_simulate(folder / "simulated.h5", args))
            plain.append(run_plain(folder / "plain.h5", args))
            print(f"  simulate {sim[-1]['seconds']:.2f} s (process {sim[-1]['process_wall']:.2f} s), plain {plain[-1]['seconds']:.2f} s",
                  file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def med(xs, key):
        vals = [x[key] for x in xs if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    MB = sim[0]["MB"]
    rss = [x["peak_rss_MB"] for x in sim if x["peak_rss_MB"] is not None]
    figures = {
        "size": {"sets": args.sets, "alternatives": J, "rows": rows, "K": args.params, "M": args.moments,
                 "design": args.design, "MB_X_dm": MB, "repeats": args.repeats},
        "load_average_end": os.getloadavg()[0],
        "cores": os.cpu_count(),
        "simulate": {
            "seconds": med(sim, "seconds"), "cpu_seconds": med(sim, "own_cpu_seconds"),
            "MB_per_s": MB / med(sim, "seconds"), "rows_per_s": rows / med(sim, "seconds"),
            "process_wall_seconds": med(sim, "process_wall"), "process_cpu_seconds": med(sim, "cpu_seconds"),
            "peak_rss_MB": max(rss) if rss else None, "runs": sim,
        },
        "plain_h5py": {
            "seconds": med(plain, "seconds"), "cpu_seconds": med(plain, "cpu_seconds"),
            "MB_per_s": MB / med(plain, "seconds"),
            "repeat_seconds": med(plain, "repeat_seconds"), "repeat_cpu_seconds": med(plain, "repeat_cpu_seconds"),
            "runs": plain,
        },
    }
    figures["ratio_wall"] = figures["simulate"]["seconds"] / figures["plain_h5py"]["seconds"]
    figures["ratio_cpu"] = figures["simulate"]["cpu_seconds"] / figures["plain_h5py"]["cpu_seconds"]
    figures["ratio_process_wall"] = figures["simulate"]["process_wall_seconds"] / figures["plain_h5py"]["seconds"]
    figures["ratio_wall_to_repeat_write"] = figures["simulate"]["seconds"] / figures["plain_h5py"]["repeat_seconds"]
    figures["ratio_cpu_to_repeat_write"] = figures["simulate"]["cpu_seconds"] / figures["plain_h5py"]["repeat_cpu_seconds"]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    s, q = figures["simulate"], figures["plain_h5py"]
    print(f"{args.sets:,} sets x {J} alternatives, K={args.params}, M={args.moments}, {args.design} design: "
          f"{rows:,} rows, {MB:,.0f} MB of X and dm; medians of {args.repeats} interleaved runs; "
          f"load average {figures['load_average_end']:.1f} on {figures['cores']} cores at the end")
    print(f"{'':34}{'wall s':>8}{'MB/s':>8}{'CPU s':>8}{'peak RSS MB':>13}")
    print(f"{'estpipe simulate (its own timing)':34}{s['seconds']:8.2f}{s['MB_per_s']:8.0f}{s['cpu_seconds']:8.2f}")
    pcpu = f"{s['process_cpu_seconds']:8.2f}" if s["process_cpu_seconds"] is not None else f"{'n/a':>8}"
    prss = f"{s['peak_rss_MB']:13.0f}" if s["peak_rss_MB"] is not None else f"{'n/a':>13}"
    print(f"{'  whole process (time -v)':34}{s['process_wall_seconds']:8.2f}{MB / s['process_wall_seconds']:8.0f}{pcpu}{prss}")
    print(f"{'plain h5py write from memory':34}{q['seconds']:8.2f}{q['MB_per_s']:8.0f}{q['cpu_seconds']:8.2f}")
    print(f"{'  the same write repeated':34}{q['repeat_seconds']:8.2f}{MB / q['repeat_seconds']:8.0f}{q['repeat_cpu_seconds']:8.2f}")
    print(f"ratio simulate / plain: wall {figures['ratio_wall']:.2f}, CPU {figures['ratio_cpu']:.2f} "
          f"(whole simulate process wall {figures['ratio_process_wall']:.2f}); "
          f"to the repeated write: wall {figures['ratio_wall_to_repeat_write']:.2f}, CPU {figures['ratio_cpu_to_repeat_write']:.2f}")


if __name__ == "__main__":
    main()
