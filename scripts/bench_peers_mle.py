"""estpipe's maximum likelihood against peer packages (issue 11), measured in ONE run, same machine,
same threads: OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = MKL_NUM_THREADS = 2 for every side (and
XLA's CPU threads for Biogeme's JAX; the machine has 2 cores).

Each side runs as its own subprocess, so the figures are
- whole-process s: wall time from exec to exit, imports and JIT compilation included;
- warm s: the estimation call alone, as printed by the side's driver (Biogeme: BIOGEME.estimate();
  xlogit: MixedLogit.fit(); estpipe: the results' wall_seconds, which also covers reading the file);
- peak MB: the child's own ru_maxrss from os.wait4 (the largest resident set of it and its waited
  descendants; per child, unlike RUSAGE_CHILDREN, which is a maximum over all children so far).

Comparisons (targets from issue 11):
1. nested logit, 7,000 sets x 3 alternatives, 2 nests (n1 = a1 alone, n2 = a2, a3), K = 4 generic
   coefficients, no ASCs: estpipe vs Biogeme 3.3.5 (lognested, the same data as a wide CSV; the
   singleton nest's mu fixed at 1, as estpipe drops its lambda; Biogeme's mu = 1 / estpipe's
   lambda). Targets: estpipe time <= 0.5x Biogeme's, estimates within 1e-4.
2. mixed logit by simulated ML, 4,000 sets x 3, 10 attributes, x1..x3 normal, 1,000 Halton draws:
   estpipe vs xlogit MixedLogit (long format), the same explicit start (the logit MLE, every sd
   0.5, given to estpipe by --start and to xlogit by init_coeff, both in the order x1..x10,
   sd_x1..sd_x3). Tolerances: xlogit's BFGS stops at |d'g| < gtol = 1e-6 (g the gradient of the
   summed -loglik, d = -H^-1 g: a Newton decrement in loglik units); estpipe --tol 1e-6 is the
   sup norm of the mean standardized score, which implies a decrement of at most about
   n P tol^2 = 5e-8, so estpipe is the stricter. The draws differ (xlogit makes its own), so
   estpipe runs with --draws-seed 0..4 and xlogit's loglik is checked against that spread. Each
   estpipe run is followed by an xlogit run (the same fit each time), and each side's time is
   its median: single runs of either side varied by 2x within an hour on this shared machine.
   Target: estpipe's whole estimation with standard errors <= 0.5x xlogit's.
3. logit 100,000 sets x 30 alternatives, K = 20 (estpipe only, in-process kernel): one
   loglik + gradient evaluation against the loglik alone, target <= 2x; and + the per-unit OPG.

Make the peers' venvs first (never estpipe dependencies):

    python3 -m venv /work/venvs/xlogit && /work/venvs/xlogit/bin/pip install xlogit
    /root/.pyenv/versions/3.12.1/bin/python -m venv /work/venvs/biogeme && \
        /work/venvs/biogeme/bin/pip install biogeme==3.3.5      # Python >= 3.12, scipy >= 1.17.1

Run (heavy: under the lock; about 1 min of work on 2 cores, 1 GB of scratch for a moment):

    flock -o /tmp/estpipe-heavy.lock python3 scripts/bench_peers_mle.py [--out /work/notes/peers-table.md]

Venvs elsewhere: --xlogit-python PATH, --biogeme-python PATH (their interpreters).

estpipe runs from this checkout's pipeline/ (PYTHONPATH). Data go to --scratch
(/tmp/peers-scratch); the 100k file (about 1 GB) is deleted at the end. A side whose venv is
missing is reported as such and the other comparisons still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS = "2"
VENV_XLOGIT = Path("/work/venvs/xlogit/bin/python")  # defaults; --xlogit-python / --biogeme-python
VENV_BIOGEME = Path("/work/venvs/biogeme/bin/python")


def child_env() -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = THREADS
    env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT / "pipeline")
    return env


@dataclass
class Run:
    """One child process: wall seconds exec to exit, its peak RSS (MB), exit code, output."""

    wall: float
    peak_mb: float
    returncode: int
    stdout: str
    stderr: str
    result: dict = field(default_factory=dict)


def run_child(cmd: list[str], cwd: str | None = None) -> Run:
    """Run cmd to completion; its own rusage via os.wait4 (ru_maxrss in KB on Linux)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=err, text=True, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        run = Run(wall, usage.ru_maxrss / 1024, proc.returncode, out.read(), err.read())
    for line in reversed(run.stdout.splitlines()):  # drivers print one JSON line last
        if line.startswith("{"):
            run.result = json.loads(line)
            break
    return run


def estpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "estpipe", *args]


def checked(run: Run, what: str) -> Run:
    if run.returncode not in (0,):
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return run


def estpipe_estimate(data: Path, out: Path, *args: str) -> Run:
    """estpipe estimate as a whole process; result = its results JSON (warm = wall_seconds)."""
    run = checked(run_child(estpipe("estimate", str(data), "--estimator", "mle", "--out", str(out), *args)),
                  f"estpipe estimate {data.name} {' '.join(args)}")
    run.result = json.loads(out.read_text())
    run.result["warm"] = run.result["wall_seconds"]
    return run


# ---------------------------------------------------------------- drivers (run in the peers' venvs)

BIOGEME_DRIVER = textwrap.dedent('''
    import json, sys, time
    import pandas as pd
    from biogeme.biogeme import BIOGEME
    from biogeme.database import Database
    from biogeme.expressions import Beta, Variable
    from biogeme.models import lognested
    from biogeme.nests import NestsForNestedLogit, OneNestForNestedLogit

    csv, spec = sys.argv[1], json.loads(sys.argv[2])
    df = pd.read_csv(csv)
    db = Database("nl", df)
    K, J = spec["K"], spec["J"]
    b = {k: Beta(f"x{k}", 0.0, None, None, 0) for k in range(1, K + 1)}
    V = {j: sum(b[k] * Variable(f"x{k}_a{j}") for k in range(1, K + 1)) for j in range(1, J + 1)}
    av = {j: Variable(f"av_a{j}") for j in range(1, J + 1)}
    nests = []
    for name, alts in spec["nests"]:
        # a nest of one alternative: mu drops out of it (estpipe gives it no parameter); fixed at 1
        mu = Beta(f"mu_{name}", 1.0, 1e-3, None, 0) if len(alts) > 1 else 1.0
        nests.append(OneNestForNestedLogit(nest_param=mu, list_of_alternatives=alts, name=name))
    logprob = lognested(V, av, NestsForNestedLogit(choice_set=list(V), tuple_of_nests=tuple(nests)),
                        Variable("choice"))
    model = BIOGEME(db, logprob, generate_html=False, generate_yaml=False, generate_netcdf=False,
                    save_iterations=False, number_of_threads=int(spec["threads"]),
                    **({"tolerance": spec["tolerance"]} if spec.get("tolerance") else {}))
    model.model_name = "peers_nl"
    t0 = time.perf_counter()
    res = model.estimate()
    warm = time.perf_counter() - t0
    print(json.dumps({"warm": warm, "loglik": float(res.final_loglikelihood),
                      "params": {k: float(v) for k, v in res.get_beta_values().items()}}))
''')

XLOGIT_DRIVER = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    from xlogit import MixedLogit

    d = np.load(sys.argv[1])
    spec = json.loads(sys.argv[2])
    names = spec["names"]
    model = MixedLogit()
    t0 = time.perf_counter()
    model.fit(X=d["X"], y=d["y"], varnames=names, alts=d["alt"], ids=d["ids"],
              randvars={v: "n" for v in spec["random"]}, n_draws=spec["draws"], halton=True,
              init_coeff=np.array(spec["start"]), tol_opts={"gtol": spec["gtol"]}, verbose=0)
    warm = time.perf_counter() - t0
    from importlib.metadata import version
    print(json.dumps({"warm": warm, "loglik": float(model.loglikelihood), "version": version("xlogit"), "converged": bool(model.convergence),
                      "message": str(model.estimation_message), "iterations": int(model.total_iter),
                      "evaluations": int(model.total_fun_eval),
                      "names": [str(n) for n in model.coeff_names], "params": [float(v) for v in model.coeff_],
                      "std_errors": [float(v) for v in model.stderr]}))
''')

LLRATIO_DRIVER = textwrap.dedent('''
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from bench_common import interleaved_medians
    from estpipe.data.format import ChoiceDataFile
    from estpipe.kernel import PartitionKernel
    from estpipe.kernel.request import Request

    with ChoiceDataFile(sys.argv[1]) as f:  # without dm, as an MLE's partitions are read
        d = f.read_sets(with_dm=False)
    k = PartitionKernel(d, model="logit")
    b = np.random.default_rng(0).normal(size=d.K) * 0.1
    reqs = {"loglik": Request.for_likelihood(b, score=False, opg=False),
            "loglik+grad": Request.for_likelihood(b, opg=False),
            "loglik+grad+opg": Request.for_likelihood(b)}
    ll = float(k.evaluate(reqs["loglik"]).loglik)
    m = interleaved_medians({n: (lambda r=r: k.evaluate(r)) for n, r in reqs.items()}, repeat=int(sys.argv[3]))
    print(json.dumps({"medians": m, "loglik": ll}))
''')


def driver(scratch: Path, name: str, text: str) -> Path:
    p = scratch / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- data for the peers

def parse_nests(text: str, alt_names: list[str]) -> list[tuple[str, list[int]]]:
    """'n1=a1; n2=a2,a3' -> [(n1, [1]), (n2, [2, 3])] with 1-based alternative numbers."""
    out = []
    for part in text.split(";"):
        name, alts = part.strip().split("=")
        out.append((name.strip(), [alt_names.index(a.strip()) + 1 for a in alts.split(",")]))
    return out


def nested_to_wide_csv(h5: Path, csv: Path) -> dict:
    """One row per set: x{k}_a{j}, av_a{j}, choice (1-based alternative). Missing alternatives: av 0."""
    with h5py.File(h5, "r") as f:
        X, chosen, alt, off = f["X"][:], f["chosen"][:], f["alt"][:], f["offsets"][:]
        alt_names = [str(a) for a in f.attrs["alt_names"]]
        nests_text = str(f.attrs["nests"])
    n, K, J = len(off) - 1, X.shape[1], len(alt_names)
    set_of_row = np.repeat(np.arange(n), np.diff(off))
    wide = np.zeros((n, J, K))
    av = np.zeros((n, J))
    wide[set_of_row, alt] = X
    av[set_of_row, alt] = 1
    choice = np.zeros(n, dtype=int)
    choice[set_of_row[chosen == 1]] = alt[chosen == 1] + 1
    cols = [f"x{k + 1}_a{j + 1}" for j in range(J) for k in range(K)] + [f"av_a{j + 1}" for j in range(J)] + ["choice"]
    data = np.column_stack([wide.reshape(n, J * K), av, choice])
    np.savetxt(csv, data, delimiter=",", header=",".join(cols), comments="", fmt="%.17g")
    return {"K": K, "J": J, "nests": parse_nests(nests_text, alt_names), "nests_text": nests_text,
            "threads": THREADS}


def mixed_to_long_npz(h5: Path, npz: Path) -> list[str]:
    with h5py.File(h5, "r") as f:
        X, chosen, alt, off = f["X"][:], f["chosen"][:], f["alt"][:], f["offsets"][:]
        names = [str(a) for a in f.attrs["param_names"]]
    ids = np.repeat(np.arange(len(off) - 1), np.diff(off))
    np.savez(npz, X=X, y=chosen.astype(np.int64), alt=alt.astype(np.int64), ids=ids)
    return names


# ---------------------------------------------------------------- the comparisons

@dataclass
class Row:
    problem: str
    side: str
    whole: float | None
    warm: float | None
    peak_mb: float | None
    loglik: str
    diff: str
    ratio: str


def fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio_text(whole: float, warm: float, target: float = 0.5) -> str:
    def verdict(r: float) -> str:
        return "met" if r <= target else "NOT met"

    return f"whole {whole:.2f}x ({verdict(whole)}), warm {warm:.2f}x ({verdict(warm)}); target <= {target}x"


def nested(scratch: Path, rows: list[Row], notes: list[str]) -> None:
    h5, csv = scratch / "nl.h5", scratch / "nl_wide.csv"
    checked(run_child(estpipe("simulate", str(h5), "--design", "nested-logit", "--sets", "7000", "--alternatives", "3",
                              "--nests", "2", "--params", "4", "--moments", "12", "--seed", "1")), "simulate nested")
    spec = nested_to_wide_csv(h5, csv)
    e = estpipe_estimate(h5, scratch / "nl_estpipe.json", "--model", "nested-logit", "--nests", spec["nests_text"])
    est = dict(zip(e.result["param_names"], e.result["params"]))
    lam = {k[len("log_lambda_"):]: float(np.exp(v)) for k, v in est.items() if k.startswith("log_lambda_")}
    problem = f"nested logit 7000x3, 2 nests ({spec['nests_text']}), K=4"
    if not VENV_BIOGEME.exists():
        notes.append(f"Biogeme: no venv at {VENV_BIOGEME}; see the docstring")
        rows.append(Row(problem, "estpipe", e.wall, e.result["warm"], e.peak_mb, f"{e.result['loglik']:.6f}", "", ""))
        return
    bio = run_child([str(VENV_BIOGEME), str(driver(scratch, "drv_biogeme.py", BIOGEME_DRIVER)), str(csv),
                     json.dumps(spec)], cwd=str(scratch))
    if bio.returncode != 0 or not bio.result:
        notes.append(f"Biogeme failed (exit {bio.returncode}): {bio.stderr.strip().splitlines()[-1:]}")
        rows.append(Row(problem, "estpipe", e.wall, e.result["warm"], e.peak_mb, f"{e.result['loglik']:.6f}", "", ""))
        return
    bp = bio.result["params"]
    diffs = [abs(est[k] - bp[k]) for k in est if not k.startswith("log_lambda_")]
    diffs += [abs(lam[n] - 1.0 / bp[f"mu_{n}"]) for n in lam]
    diff = max(diffs)
    notes.append("nested: estpipe " + ", ".join(f"{k} {v:.6f}" for k, v in est.items() if not k.startswith("log_"))
                 + ", " + ", ".join(f"lambda_{n} {v:.6f}" for n, v in lam.items()) + "; Biogeme "
                 + ", ".join(f"{k} {v:.6f}" for k, v in bp.items()) + " (1/mu: "
                 + ", ".join(f"{1 / bp[f'mu_{n}']:.6f}" for n in lam) + ")")
    rows.append(Row(problem, "estpipe", e.wall, e.result["warm"], e.peak_mb, f"{e.result['loglik']:.6f}",
                    f"{diff:.1e} (target 1e-4: {'met' if diff <= 1e-4 else 'NOT met'})",
                    ratio_text(e.wall / bio.wall, e.result["warm"] / bio.result["warm"])))
    rows.append(Row(problem, "Biogeme 3.3.5", bio.wall, bio.result["warm"], bio.peak_mb,
                    f"{bio.result['loglik']:.6f}", "", "1"))
    # Biogeme's default stop (relative gradient 6e-6) is looser than estpipe's: the same model
    # to a tight tolerance shows whether the remaining difference is the stopping rule
    tight = run_child([str(VENV_BIOGEME), str(scratch / "drv_biogeme.py"), str(csv),
                       json.dumps(spec | {"tolerance": 1e-10})], cwd=str(scratch))
    if tight.returncode == 0 and tight.result:
        tp = tight.result["params"]
        td = max([abs(est[k] - tp[k]) for k in est if not k.startswith("log_lambda_")]
                 + [abs(lam[n] - 1.0 / tp[f"mu_{n}"]) for n in lam])
        rows.append(Row(problem, "Biogeme 3.3.5, tolerance 1e-10", tight.wall, tight.result["warm"], tight.peak_mb,
                        f"{tight.result['loglik']:.6f}", f"{td:.1e}", f"{tight.wall / bio.wall:.2f}x Biogeme default"))
    else:
        notes.append(f"Biogeme with tolerance 1e-10 failed (exit {tight.returncode}): "
                     f"{tight.stderr.strip().splitlines()[-1:]}")


def mixed(scratch: Path, rows: list[Row], notes: list[str], seeds: int) -> None:
    h5, npz = scratch / "mx.h5", scratch / "mx_long.npz"
    random = ["x1", "x2", "x3"]
    checked(run_child(estpipe("simulate", str(h5), "--design", "mixed-logit", "--sets", "4000", "--alternatives", "3",
                              "--params", "10", "--moments", "30", "--random", ",".join(random), "--seed", "2")),
            "simulate mixed")
    names = mixed_to_long_npz(h5, npz)
    # the common start: estpipe's own default (the logit MLE, every sd 0.5), made explicit for both
    logit = estpipe_estimate(h5, scratch / "mx_logit.json", "--model", "logit")
    start = list(logit.result["params"]) + [0.5] * len(random)
    start_text = ",".join(repr(float(v)) for v in start)
    tol = "1e-6"
    spec = {"names": names, "random": random, "draws": 1000, "start": start, "gtol": float(tol)}
    have_xlogit = VENV_XLOGIT.exists()
    # estpipe's seeds interleaved with as many xlogit runs (the same fit each time: xlogit's draws
    # are its own), so that both sides' medians see the same stretch of a noisy shared machine
    runs, xls = [], []
    for s in range(seeds):
        runs.append(estpipe_estimate(h5, scratch / f"mx_estpipe_{s}.json", "--model", "mixed-logit", "--random",
                                     ",".join(random), "--draws", "1000", "--draws-kind", "halton", "--draws-seed",
                                     str(s), "--start", start_text, "--tol", tol))
        if have_xlogit:
            xls.append(run_child([str(VENV_XLOGIT), str(driver(scratch, "drv_xlogit.py", XLOGIT_DRIVER)), str(npz),
                                  json.dumps(spec)], cwd=str(scratch)))
    lls = [r.result["loglik"] for r in runs]
    walls, warms = [r.wall for r in runs], [r.result["warm"] for r in runs]
    e = runs[0]
    problem = "mixed logit SML 4000x3, K=10, 3 normal, 1000 Halton"
    spread = f"{min(lls):.4f}..{max(lls):.4f}"
    notes.append(f"mixed: estpipe over --draws-seed 0..{seeds - 1}: loglik {spread}; whole s "
                 + ", ".join(f"{w:.2f}" for w in walls) + "; warm s " + ", ".join(f"{w:.2f}" for w in warms)
                 + f"; evaluations {[r.result['evaluations'] for r in runs]}; converged "
                 f"{[r.result['converged'] for r in runs]}; start (both sides) {[round(v, 6) for v in start]}")
    med_wall, med_warm = float(np.median(walls)), float(np.median(warms))
    if not have_xlogit:
        notes.append(f"xlogit: no venv at {VENV_XLOGIT}; see the docstring")
        rows.append(Row(problem, f"estpipe (median of {seeds} draw seeds)", med_wall, med_warm,
                        max(r.peak_mb for r in runs), spread, "", ""))
        return
    bad = [x for x in xls if x.returncode != 0 or not x.result]
    if bad:
        notes.append(f"xlogit failed (exit {bad[0].returncode}): {bad[0].stderr.strip().splitlines()[-1:]}")
        return
    xl = xls[0]  # the fit (the same in every run); its times: the medians over the runs
    xl_wall = float(np.median([x.wall for x in xls]))
    xl_warm = float(np.median([x.result["warm"] for x in xls]))
    xl_peak = max(x.peak_mb for x in xls)
    notes.append(f"mixed: xlogit over {len(xls)} runs interleaved with estpipe's: whole s "
                 + ", ".join(f"{x.wall:.2f}" for x in xls) + "; warm s "
                 + ", ".join(f"{x.result['warm']:.2f}" for x in xls))
    # an sd enters as sd * draw with symmetric draws, so its sign is arbitrary (xlogit may return a
    # negative one): compare |sd| only; the means keep their signs
    sd = np.arange(len(start)) >= len(names)
    xp = np.array(xl.result["params"])
    ep = np.array([r.result["params"] for r in runs])
    xp[sd], ep[:, sd] = np.abs(xp[sd]), np.abs(ep[:, sd])
    diff = float(np.max(np.abs(ep - xp)))
    inside = min(lls) <= xl.result["loglik"] <= max(lls)
    notes.append(f"mixed: xlogit loglik {xl.result['loglik']:.4f} ({'inside' if inside else 'OUTSIDE'} estpipe's "
                 f"spread {spread}); converged {xl.result['converged']} ({xl.result['message']}), "
                 f"{xl.result['iterations']} iterations, {xl.result['evaluations']} loglik evaluations, standard errors "
                 f"from its BHHH (inverse OPG) matrix (no Hessian); names {xl.result['names']}; params "
                 f"{[round(v, 4) for v in xl.result['params']]}; estpipe seed 0 params "
                 f"{[round(v, 4) for v in e.result['params']]}")
    rows.append(Row(problem, f"estpipe (median of {seeds} draw seeds)", med_wall, med_warm,
                    max(r.peak_mb for r in runs), spread,
                    f"{diff:.1e} (max over seeds; draws differ)",
                    ratio_text(med_wall / xl_wall, med_warm / xl_warm)))
    evals = [r.result["evaluations"] for r in runs]
    # xlogit's BFGS: one loglik + gradient call at the start and per iteration, and loglik-only
    # line-search trials (its nfev counts the start and the trials)
    xl_calls = xl.result["evaluations"] + xl.result["iterations"]
    notes.append(f"mixed: seconds per likelihood call (warm / calls): estpipe {med_warm / float(np.median(evals)):.3f} "
                 f"over {int(np.median(evals))} (each a loglik with its score and the per-unit OPG); xlogit "
                 f"{xl_warm / xl_calls:.3f} over about {xl_calls} ({xl.result['iterations'] + 1} loglik + "
                 f"gradient, {xl.result['evaluations'] - 1} loglik-only trials). estpipe's calls, from its message: "
                 + e.result["message"])
    # where estpipe's time goes: its history's clock at the optimizer's last accepted iteration
    # (seconds since the run began) against the whole warm time; the rest is mostly the Hessian
    # that the classical and robust errors need (exact for these normal coefficients)
    opt_end = [r.result["steps"][0]["history"][-1]["seconds"] for r in runs if r.result["steps"][0].get("history")]
    if opt_end:
        t_opt = float(np.median(opt_end))
        per_eval = float(np.median([r.result["timing"]["evaluation_seconds"] / r.result["evaluations"] for r in runs]))
        notes.append(f"mixed: estpipe's clock at the optimizer's end (median over seeds) {t_opt:.2f} s of {med_warm:.2f} s "
                     f"warm ({t_opt / xl_warm:.2f}x xlogit's warm fit, which includes its BHHH errors); "
                     f"{per_eval:.3f} s per evaluation (the Hessian's counted as one)")
    # like for like: xlogit reports BHHH (inverse OPG) errors; estpipe --se bhhh makes no Hessian either
    bh = [estpipe_estimate(h5, scratch / f"mx_estpipe_bhhh_{s}.json", "--model", "mixed-logit", "--random",
                           ",".join(random), "--draws", "1000", "--draws-kind", "halton", "--draws-seed", str(s),
                           "--start", start_text, "--tol", tol, "--se", "bhhh") for s in range(seeds)]
    bh_wall, bh_warm = float(np.median([r.wall for r in bh])), float(np.median([r.result["warm"] for r in bh]))
    bse = np.array(bh[0].result["std_errors"])
    xse = np.array(xl.result.get("std_errors") or [np.nan] * len(bse))
    notes.append(f"mixed, --se bhhh: whole s {[round(r.wall, 2) for r in bh]}, evaluations "
                 f"{[r.result['evaluations'] for r in bh]}; max relative difference of its BHHH standard errors (seed 0) "
                 f"from xlogit's {float(np.nanmax(np.abs(bse / xse - 1))):.2g}")
    rows.append(Row(problem, f"estpipe --se bhhh (median of {seeds} seeds; xlogit's kind of errors)", bh_wall, bh_warm,
                    max(r.peak_mb for r in bh), f"{float(np.median([r.result['loglik'] for r in bh])):.4f}", "",
                    ratio_text(bh_wall / xl_wall, bh_warm / xl_warm)))
    rows.append(Row(problem, f"xlogit {xl.result.get('version', '')} (median of {len(xls)} runs)", xl_wall, xl_warm,
                    xl_peak,
                    f"{xl.result['loglik']:.4f} ({'inside' if inside else 'OUTSIDE'} spread)", "", "1"))


def llratio(scratch: Path, rows: list[Row], notes: list[str], repeat: int, keep: bool) -> None:
    h5 = scratch / "big.h5"
    try:
        checked(run_child(estpipe("simulate", str(h5), "--sets", "100000", "--alternatives", "30", "--params", "20",
                                  "--moments", "20")), "simulate big")
        r = checked(run_child([sys.executable, str(driver(scratch, "drv_llratio.py", LLRATIO_DRIVER)), str(h5),
                               str(ROOT / "scripts"), str(repeat)]), "llratio")
    finally:
        if not keep:
            h5.unlink(missing_ok=True)
    m = r.result["medians"]
    g, o = m["loglik+grad"] / m["loglik"], m["loglik+grad+opg"] / m["loglik"]
    problem = "logit 100000x30, K=20: one evaluation (in-process)"
    notes.append(f"llratio: medians of {repeat} interleaved, ms " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in m.items()))
    rows.append(Row(problem, "estpipe loglik", r.wall, m["loglik"], r.peak_mb, f"{r.result['loglik']:.2f}", "", "1"))
    rows.append(Row(problem, "estpipe loglik+grad", None, m["loglik+grad"], None, "", "",
                    f"{g:.2f}x loglik (target <= 2x: {'met' if g <= 2 else 'NOT met'})"))
    rows.append(Row(problem, "estpipe loglik+grad+OPG", None, m["loglik+grad+opg"], None, "", "",
                    f"{o:.2f}x loglik"))


def main() -> None:
    global VENV_XLOGIT, VENV_BIOGEME
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/peers-scratch")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--seeds", type=int, default=5, help="estpipe draw seeds for the mixed logit")
    ap.add_argument("--repeat", type=int, default=9, help="rounds of the interleaved kernel timings (>= 7)")
    ap.add_argument("--only", default="nested,mixed,llratio")
    ap.add_argument("--keep-big", action="store_true", help="keep the 100k file")
    ap.add_argument("--xlogit-python", default=str(VENV_XLOGIT), help="python of the xlogit venv")
    ap.add_argument("--biogeme-python", default=str(VENV_BIOGEME), help="python of the Biogeme venv")
    a = ap.parse_args()
    VENV_XLOGIT, VENV_BIOGEME = Path(a.xlogit_python), Path(a.biogeme_python)
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    only = a.only.split(",")
    if "nested" in only:
        nested(scratch, rows, notes)
    if "mixed" in only:
        mixed(scratch, rows, notes, a.seeds)
    if "llratio" in only:
        llratio(scratch, rows, notes, a.repeat, a.keep_big)
    head = ("| problem | side | whole-process s | warm s | peak MB | loglik | max abs estimate difference | ratio vs target |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r.problem} | {r.side} | {fmt(r.whole)} | {fmt(r.warm, 3)} | {fmt(r.peak_mb, 0)} | {r.loglik} | "
                   f"{r.diff} | {r.ratio} |\n" for r in rows)
    text = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by scripts/bench_peers_mle.py "
            f"({os.cpu_count()} cores, {THREADS} BLAS/OMP/XLA threads every side, one run, {time.perf_counter() - t0:.0f} s)\n\n"
            + head + body + "\n" + "".join(f"- {n}\n" for n in notes))
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
