"""What the benchmark scripts share: run a command as a whole process and sample the memory of
it and all its children (client, scheduler, nannies, dask workers) in a background thread.

Three sums are kept, each the peak over the run of the sum over the process tree:
- rss: resident pages per process. Pages shared between processes (the Python interpreter, numpy's
  and OpenBLAS's libraries, mapped by every worker) are counted once per process: an overcount.
- pss: proportional set size, each shared page split between the processes that map it. The sum
  over all processes is exactly the memory they use together; this is the figure we judge by.
- uss: pages private to one process. Leaves the shared pages out entirely: an undercount.
/usr/bin/time -v would report only the largest single process's peak, not a sum.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil

SAMPLE_SECONDS = 0.05


@dataclass
class TreeMemory:
    """Peaks (bytes) of the summed memory of a process tree."""

    rss: int = 0
    pss: int = 0
    uss: int = 0

    def sample(self, root: psutil.Process) -> None:
        rss = pss = uss = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                m = p.memory_full_info()  # /proc/PID/smaps_rollup: well under 1 ms per process
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss, pss, uss = rss + m.rss, pss + m.pss, uss + m.uss
        self.rss, self.pss, self.uss = max(self.rss, rss), max(self.pss, pss), max(self.uss, uss)


@dataclass
class Measured:
    """One whole-process run: wall seconds from start to exit, memory peaks, output, exit code."""

    cmd: list[str]
    wall: float
    memory: TreeMemory
    returncode: int
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict | None = None, interval: float = SAMPLE_SECONDS) -> Measured:
    """Run cmd to completion, sampling the summed memory of its process tree every `interval` s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory()
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                memory.sample(root)
            except psutil.Error:
                pass
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    return Measured(cmd=cmd, wall=wall, memory=memory, returncode=proc.returncode, stdout=out, stderr=err)


def gb(n: float) -> str:
    """Bytes as decimal GB (the unit of the issue's targets: 1.44 GB of data)."""
    return f"{n / 1e9:.2f}"


def interleaved_medians(calls: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each call (name -> function of no arguments) over `repeat` rounds, the
    calls interleaved within each round so that the machine's noise hits all of them alike; one
    warm-up call each first."""
    import time

    import numpy as np

    for fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(repeat):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}
