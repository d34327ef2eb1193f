"""A/B of kernel.blas.keep_freed_memory (glibc keeps freed heap memory for the next evaluation) on
`estpipe bench --sets 20000 --alternatives 30`: interleaved subprocesses, 3 each, medians in ms.

    python3 scripts/bench_heap.py

Measured 2026-12-02 (2 cores, shared): without / with: f 15.3 / 11.8, value 10.7 / 10.2, dual
36.2 / 34.4, dual-generic 45.9 / 42.9, adjoint 19.9 / 19.3, fd 216 / 207. The mixed logit's
simulated likelihood (4,000 x 3, 1,000 draws) gains most: 0.12-0.18 s per evaluation without,
0.072-0.086 s with (scripts/bench_peers_mle.py measures it inside the whole estimation)."""
import json, subprocess, sys, os
def run(keep):
    env = dict(os.environ, ESTPIPE_AB_NOKEEP="" if keep else "1")
    code = ("import os, estpipe.kernel.blas as b\n"
            "if os.environ.get('ESTPIPE_AB_NOKEEP'): b.keep_freed_memory = lambda: False; import estpipe.kernel.engine as e; e.keep_freed_memory = lambda: False\n"
            "from estpipe.cli.app import main; import sys; sys.argv=['estpipe','bench','--sets','20000','--alternatives','30','--repeat','10','--json']; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    d = json.loads(out[out.index("{"):])
    return {r["name"]: r["median_ms"] if "median_ms" in r else r.get("median") for r in d["rows"]}
res = {True: [], False: []}
for i in range(3):
    for keep in (i % 2 == 0, i % 2 != 0):
        res[keep].append(run(keep))
import statistics
for keep in (False, True):
    names = res[keep][0].keys()
    print("keep" if keep else "nokeep", {n: round(statistics.median(r[n] for r in res[keep]), 3) for n in names})
