"""SIGINT, SIGTERM and SIGHUP end every command promptly, by the signal itself, with nothing
half-written left: real `python -m estpipe` processes, real signals at several points (during the
imports, while simulate and load write, during estimate's iterations with a checkpoint, during
`run`'s data step, with dask worker processes), and a checkpoint left behind that a later
`--resume` run finishes from."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from estpipe import interrupts
from estpipe.cli.app import main
from estpipe.data.format import ChoiceDataFile
from estpipe.orchestration import EstimateOptions
from estpipe.orchestration.checkpoint import load_checkpoint
from estpipe.data.simulate import simulate_choice_data

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM"),
           pytest.param(signal.SIGHUP, id="SIGHUP")]
# After the signal, the process must be gone within this many seconds.
PROMPT_SECONDS = 5.0


def _estpipe(args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "estpipe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def _skip_if_ignored(signum: int) -> None:
    # An ignored signal is inherited and stays ignored in estpipe (as nohup wants).
    if signal.getsignal(signum) is signal.SIG_IGN:
        pytest.skip(f"{signal.Signals(signum).name} is ignored in this test runner")


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.01)


def _has_tmp(folder: Path):
    return lambda: any(p.name.endswith(".tmp") for p in folder.iterdir())


def _stop(proc: subprocess.Popen, signum: int) -> tuple[str, str, float]:
    """Send signum, wait (bounded); returns stdout, stderr and the seconds it took to end."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=PROMPT_SECONDS + 25)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {PROMPT_SECONDS + 25} s after {signal.Signals(signum).name}")
    return out, err, time.monotonic() - t0


def _assert_died_by(proc: subprocess.Popen, signum: int, seconds: float, err: str) -> None:
    assert proc.returncode == -signum, (proc.returncode, err[-2000:])
    assert seconds < PROMPT_SECONDS, f"took {seconds:.1f} s to end"
    assert "Traceback" not in err, err[-2000:]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".probe")))


# -- the data the commands work on -------------------------------------------------------------
@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    """An estimation of a few seconds in-process (about 0.1 s per iteration)."""
    path = tmp_path_factory.mktemp("interrupt-data") / "long.h5"
    simulate_choice_data(path, sets=100_000, alternatives=(20, 20), params=4, moments=8, seed=3)
    return path


@pytest.fixture(scope="module")
def long_csv(tmp_path_factory) -> Path:
    """1,000,000 rows of long-format CSV: a value pass of about a second."""
    path = tmp_path_factory.mktemp("interrupt-csv") / "long.csv"
    rng = np.random.default_rng(0)
    n_sets, J = 200_000, 5
    sets = np.repeat(np.arange(n_sets), J)
    choice = np.zeros(n_sets * J, dtype=np.int8)
    choice[np.arange(n_sets) * J + rng.integers(0, J, n_sets)] = 1
    x1, x2 = rng.standard_normal((2, n_sets * J)).round(4)
    with path.open("w") as f:
        f.write("set,choice,x1,x2\n")
        np.savetxt(f, np.column_stack([sets, choice, x1, x2]), fmt=["%d", "%d", "%.4f", "%.4f"], delimiter=",")
    return path


# -- the points where a signal arrives ---------------------------------------------------------
def _simulate_args(out: Path) -> list:
    # about 2 s of writing (10 million rows of 4 float64 columns)
    return ["simulate", out, "--sets", "1000000", "--alternatives", "10", "--params", "2", "--moments", "2"]


@pytest.mark.parametrize("delay", [pytest.param(0.1, id="0.1s"), pytest.param(0.3, id="0.3s"),
                                   pytest.param(0.5, id="0.5s")])
@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_in_the_first_half_second(tmp_path, signum, delay):
    """During the imports (and, at 0.5 s, perhaps the first chunks): the default disposition's
    death, no traceback, no file."""
    _skip_if_ignored(signum)
    proc = _estpipe(_simulate_args(tmp_path / "data.h5"))
    time.sleep(delay)
    _, err, seconds = _stop(proc, signum)
    _assert_died_by(proc, signum, seconds, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_while_simulate_writes(tmp_path, signum):
    _skip_if_ignored(signum)
    proc = _estpipe(_simulate_args(tmp_path / "data.h5"))
    _wait_for(_has_tmp(tmp_path), proc, "temporary file")
    time.sleep(0.2)
    _, err, seconds = _stop(proc, signum)
    _assert_died_by(proc, signum, seconds, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_loads_value_pass(tmp_path, long_csv, signum):
    """The writer exists only in the value pass (after the structure pass)."""
    _skip_if_ignored(signum)
    proc = _estpipe(["load", long_csv, tmp_path / "data.h5", "--set-col", "set", "--choice-col", "choice",
                     "--x", "x1,x2"])
    _wait_for(_has_tmp(tmp_path), proc, "temporary file")
    time.sleep(0.1)
    _, err, seconds = _stop(proc, signum)
    _assert_died_by(proc, signum, seconds, err)
    assert list(tmp_path.iterdir()) == []


def _assert_checkpoint_resumes(data: Path, ckpt: Path, out: Path) -> None:
    """The checkpoint left behind is valid, and a `--resume` run finishes from it."""
    with ChoiceDataFile(data) as f:
        fingerprint = f.fingerprint()
    options = EstimateOptions()
    assert load_checkpoint(ckpt, fingerprint, options.result_options(), str(data)).history
    resumed = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(data), "--checkpoint", str(ckpt),
                              "--resume", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert json.loads(out.read_text())["converged"] is True


def _accepted_iterations(ckpt: Path):
    def check() -> bool:
        try:
            return len(json.loads(ckpt.read_text())["history"]) >= 1
        except (OSError, ValueError, KeyError):
            return False

    return check


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_estimate_iterations_leaves_a_resumable_checkpoint(tmp_path, long_data, signum):
    _skip_if_ignored(signum)
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "results.json"
    proc = _estpipe(["estimate", long_data, "--checkpoint", ckpt, "--out", out])
    _wait_for(_accepted_iterations(ckpt), proc, "accepted iteration in the checkpoint")
    _, err, seconds = _stop(proc, signum)
    _assert_died_by(proc, signum, seconds, err)
    assert not out.exists() and _leftovers(tmp_path) == []
    _assert_checkpoint_resumes(long_data, ckpt, out)


def _live(processes: list[psutil.Process]) -> list[int]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_with_dask_workers_leaves_no_worker_process(tmp_path, long_data, signum):
    _skip_if_ignored(signum)
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "results.json"
    proc = _estpipe(["estimate", long_data, "--workers", "2", "--checkpoint", ckpt, "--out", out])
    me = psutil.Process(proc.pid)

    def workers():
        found = []
        for c in me.children(recursive=True):
            try:  # a short-lived helper process may be gone between the listing and its cmdline
                if "spawn_main" in " ".join(c.cmdline()):
                    found.append(c)
            except psutil.NoSuchProcess:
                pass
        return found

    _wait_for(lambda: len(workers()) >= 2 and _accepted_iterations(ckpt)(), proc, "2 workers and an accepted iteration")
    children = me.children(recursive=True)
    _, err, seconds = _stop(proc, signum)
    _assert_died_by(proc, signum, seconds, err)
    deadline = time.monotonic() + 3
    while _live(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live(children) == [], "dask worker processes outlived the run"
    assert not out.exists() and _leftovers(tmp_path) == []
    _assert_checkpoint_resumes(long_data, ckpt, out)


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_during_runs_data_step(tmp_path, signum):
    _skip_if_ignored(signum)
    spec = tmp_path / "job.toml"
    spec.write_text(textwrap.dedent("""
        [data]
        path = "data/data.h5"
        sets = 1000000
        alternatives = 10
        params = 2
        moments = 2
        [output]
        results = "out/results.json"
        checkpoint = "out/checkpoint.json"
    """))
    proc = _estpipe(["run", spec])
    (tmp_path / "data").mkdir(exist_ok=True)
    _wait_for(_has_tmp(tmp_path / "data"), proc, "temporary data file")
    time.sleep(0.1)
    _, err, seconds = _stop(proc, signum)
    _assert_died_by(proc, signum, seconds, err)
    assert list((tmp_path / "data").iterdir()) == []
    assert not (tmp_path / "out" / "results.json").exists() and _leftovers(tmp_path) == []


# -- the mechanism itself ------------------------------------------------------------------------
_SLOW_CLEANUP = """
import os, sys, time
from estpipe import interrupts
interrupts.install()
interrupts.register(lambda: time.sleep(30), "a cleanup that hangs")
print("ready", flush=True)
time.sleep(60)
"""


def test_a_second_signal_during_cleanup_kills_at_once():
    _skip_if_ignored(signal.SIGINT)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLEANUP], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None, "the hanging cleanup should still be running"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGINT and time.monotonic() - t0 < 2


_NOHUP = """
import os, signal, sys
signal.signal(signal.SIGHUP, signal.SIG_IGN)
os.execv(sys.executable, [sys.executable, "-m", "estpipe", *sys.argv[1:]])
"""


def test_an_ignored_sighup_stays_ignored(tmp_path):
    """`nohup estpipe ...` must survive the terminal's hangup."""
    out = tmp_path / "data.h5"
    args = ["simulate", str(out), "--sets", "200000", "--alternatives", "10", "--params", "2", "--moments", "2"]
    proc = subprocess.Popen([sys.executable, "-c", _NOHUP, *args], stderr=subprocess.PIPE, text=True)
    _wait_for(_has_tmp(tmp_path), proc, "temporary file")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.exists() and _leftovers(tmp_path) == []


def test_main_in_process_restores_the_previous_handlers(tmp_path, capsys):
    """Tests and notebooks call main(argv) in-process: the handlers are estpipe's only meanwhile."""
    seen = {}

    def record(signum, frame):
        pass

    previous = {s: signal.signal(s, record) for s in interrupts.SIGNALS}
    registered = interrupts.registered()
    try:
        data = tmp_path / "small.h5"
        simulate_choice_data(data, sets=20, alternatives=(3, 3), params=2, moments=2)
        original = interrupts.install

        def spy():
            prev = original()
            seen.update({s: signal.getsignal(s) for s in interrupts.SIGNALS})
            return prev

        interrupts.install = spy
        try:
            with pytest.raises(SystemExit) as info:
                main(["inspect", str(data)])
        finally:
            interrupts.install = original
        assert info.value.code in (0, None)
        assert all(seen[s] is interrupts._handle for s in interrupts.SIGNALS)
        assert all(signal.getsignal(s) is record for s in interrupts.SIGNALS)
        assert interrupts.registered() == registered  # nothing left registered
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def test_import_installs_nothing():
    done = subprocess.run([sys.executable, "-c", "import signal, estpipe, estpipe.data.simulate, estpipe.orchestration; "
                           "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
                           "signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"], capture_output=True, text=True)
    assert done.stdout.split() == ["True", "True"], done.stderr


# -- submit: a job the batch system accepted is never hidden -----------------------------------
@pytest.mark.slurm
def test_submit_stopped_while_sbatch_runs_prints_the_accepted_job(tmp_path):
    """sbatch behind a one-second delay (a shim on PATH that then runs the real sbatch), the
    signal during that second: the process waits for sbatch and names the job it accepted."""
    import shutil

    real = shutil.which("sbatch")
    if real is None:
        pytest.skip("no sbatch (scripts/slurm-local.sh start)")
    subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"), "start"],
                   capture_output=True, timeout=600, check=True)
    shim = tmp_path / "bin"
    shim.mkdir()
    started = tmp_path / "sbatch-started"
    (shim / "sbatch").write_text(f"#!/bin/sh\ntouch {started}\nsleep 1\nexec {real} \"$@\"\n")
    (shim / "sbatch").chmod(0o755)
    spec = tmp_path / "job.toml"
    spec.write_text(textwrap.dedent(f"""
        [data]
        path = "{tmp_path}/data.h5"
        sets = 500
        [backend]
        kind = "slurm"
        workers = 1
        cores = 1
        memory = "1GB"
        walltime = "00:05:00"
        partition = "debug"
        [output]
        results = "{tmp_path}/results.json"
        checkpoint = "{tmp_path}/checkpoint.json"
        logs = "{tmp_path}/logs"
    """))
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "estpipe", "submit", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(started.exists, proc, "sbatch start")
    _, err, seconds = _stop(proc, signal.SIGINT)
    assert proc.returncode == -signal.SIGINT, err
    match = re.search(r"accepted slurm job (\d+)", err)
    assert match, err
    job_id = match.group(1)
    try:
        queued = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
        assert f"JobId={job_id}" in queued.stdout
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


@pytest.mark.slurm
def test_signal_with_jobqueue_workers_cancels_their_batch_jobs(tmp_path, long_data):
    """dask-jobqueue workers are Slurm jobs: a signal cancels them (scancel), rather than leaving
    them to notice that their scheduler is gone."""
    import shutil

    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch (scripts/slurm-local.sh start)")
    subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "slurm-local.sh"), "start"],
                   capture_output=True, timeout=600, check=True)
    def worker_jobs() -> set[str]:
        out = subprocess.run(["squeue", "-h", "-n", "dask-worker", "-o", "%i"], capture_output=True, text=True).stdout
        return set(out.split())

    before = worker_jobs()
    ckpt = tmp_path / "run.ckpt"
    env = dict(os.environ, DASK_JOBQUEUE__SLURM__INTERFACE="lo")
    proc = subprocess.Popen([sys.executable, "-m", "estpipe", "estimate", str(long_data), "--jobqueue", "slurm",
                             "--workers", "1", "--connect-timeout", "120", "--checkpoint", str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)

    def our_jobs() -> list[str]:
        return sorted(worker_jobs() - before)

    _wait_for(lambda: our_jobs() and _accepted_iterations(ckpt)(), proc, "a worker job and an accepted iteration",
              timeout=180)
    jobs = our_jobs()
    _, err, seconds = _stop(proc, signal.SIGTERM)
    try:
        _assert_died_by(proc, signal.SIGTERM, seconds, err)
        deadline = time.monotonic() + 15
        while our_jobs() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert our_jobs() == [], "the worker jobs outlived the run"
        # cancelled, not ended on their own once the scheduler was gone (which takes seconds)
        for job in jobs:
            shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            assert "JobState=CANCELLED" in shown, shown
    finally:
        subprocess.run(["scancel", *jobs], capture_output=True)
