"""`estpipe submit` and `--jobqueue slurm` against a REAL single-node Slurm on this machine
(scripts/slurm-local.sh start: installs slurm + munge when missing; needs root, as in CI).

Every job is checked from its own output (the results file it wrote and its log), never only from
its state: a job can report COMPLETED without having run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from estpipe.errors import UserError
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.jobs import load_job_spec
from estpipe.jobs.run import run_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm; the seconds `start` took are kept for the report."""
    t0 = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm-local.sh"), "start"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"scripts/slurm-local.sh start failed:\n{done.stdout}\n{done.stderr}")
    return {"start_seconds": time.perf_counter() - t0}


def test_slurm_daemons_listen_on_loopback_only(slurm):
    """scripts/slurm-local.sh says loopback only: slurmctld and slurmd listen on 127.0.0.1 (not
    on every address, Slurm's default), munged on a unix socket alone."""
    import ipaddress

    import psutil

    listening: dict[str, list[str]] = {}
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] in ("slurmctld", "slurmd", "munged"):
            try:
                sockets = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listening.setdefault(proc.info["name"], []).extend(
                c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN)
    assert listening.get("slurmctld") and listening.get("slurmd"), listening
    assert not listening.get("munged"), listening
    assert all(ipaddress.ip_address(ip).is_loopback for ips in listening.values() for ip in ips), listening


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_for_job(job_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(0.25)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"Slurm job {job_id} did not finish within {timeout} s (state {job_state(job_id)})")


def submit(spec_path: Path) -> dict:
    """`estpipe submit` as a user runs it; returns the job id and the paths it printed."""
    done = subprocess.run([sys.executable, "-m", "estpipe", "submit", str(spec_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = dict(re.findall(r"^\s+(\w+):\s+(\S+)$", done.stdout, re.M))
    job_id = re.search(r"submitted slurm job (\d+)", done.stdout).group(1)
    return {"job_id": job_id, **{key: Path(value) for key, value in printed.items()}}


def spec_in(tmp_path: Path, source: Path, backend: str | None = None, data: dict | None = None) -> Path:
    """A copy of a shipped spec whose paths are inside tmp_path (and optional replacements)."""
    text = source.read_text()
    text = re.sub(r'"\.\./out/\w+/', '"', text)  # ../out/<name>/x -> x, next to the copy
    if backend is not None:
        text = re.sub(r"\[backend\].*?(?=\n\[output\])", backend.strip() + "\n", text, flags=re.S)
    for key, value in (data or {}).items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
        assert n == 1, key
    path = tmp_path / source.name
    path.write_text(text)
    return path


def local_copy(spec_path: Path, name: str) -> Path:
    """The same job with the local back end and its own results and checkpoint (same data file)."""
    text = re.sub(r"\[backend\].*?(?=\n\[output\])", '[backend]\nkind = "local"\n', spec_path.read_text(), flags=re.S)
    text = re.sub(r'^(results|checkpoint) = "(.*)"$', lambda m: f'{m.group(1)} = "{name}-{m.group(2)}"', text, flags=re.M)
    path = spec_path.with_name(f"{name}.toml")
    path.write_text(text)
    return path


def assert_same_estimate(job: dict, reference: dict, rtol: float) -> None:
    assert job["converged"] and reference["converged"]
    np.testing.assert_allclose(job["params"], reference["params"], rtol=rtol, atol=0)
    np.testing.assert_allclose(job["std_errors"], reference["std_errors"], rtol=rtol * 100, atol=0)
    np.testing.assert_allclose(job["objective"], reference["objective"], rtol=rtol * 100)


@pytest.mark.parametrize(
    ("source", "backend", "data"),
    [
        pytest.param("seed.toml", None, None, id="seed-as-shipped"),
        pytest.param("slurm.toml", None, {"sets": 4000}, id="larger-2-workers"),
        pytest.param("mixed-slurm.toml", None, None, id="panel-mixed-logit"),
        pytest.param("nested-slurm.toml", None, {"sets": 10000}, id="nested-logit"),
    ],
)
def test_submitted_job_equals_an_in_process_run(slurm, tmp_path, source, backend, data):
    spec_path = spec_in(tmp_path, JOBS / source, backend, data)
    spec = load_job_spec(spec_path)
    assert not spec.data.path.exists()  # the job makes its data itself
    t0 = time.perf_counter()
    job = submit(spec_path)
    state = wait_for_job(job["job_id"])
    seconds = time.perf_counter() - t0
    log = job["log"].read_text()
    assert state == "COMPLETED", f"job {job['job_id']} {state}:\n{log}"
    assert job["results"] == spec.output.results and job["log"] == spec.output.logs / f"{spec.name}-{job['job_id']}.out"
    results = json.loads(spec.output.results.read_text())
    assert f"{spec.backend.workers} dask worker" in log and "two-step GMM" in log
    assert results["data"]["path"] == str(spec.data.path) and results["workers"] == spec.backend.workers
    assert "dask cluster" in results["backend"]

    # The same job in-process on the same data file: the same estimate.
    reference_spec = load_job_spec(local_copy(spec_path, "in-process"))
    assert run_job(reference_spec) == 0
    reference = json.loads(reference_spec.output.results.read_text())
    assert_same_estimate(results, reference, rtol=1e-8)
    print(f"\n{source}: submit to done {seconds:.1f} s; Slurm start {slurm['start_seconds']:.1f} s")


def _evaluations(checkpoint: Path) -> int:
    try:
        return int(json.loads(checkpoint.read_text())["evaluations"])
    except (OSError, ValueError, KeyError):
        return 0


def test_cancelled_job_resumes_from_its_checkpoint_when_submitted_again(slurm, tmp_path):
    spec_path = spec_in(tmp_path, JOBS / "slurm.toml", data={"sets": 4000})
    # Finite differences make each iteration about half a second here: easy to catch mid-run.
    spec_path.write_text(spec_path.read_text().replace("[estimate]\n", '[estimate]\nderivatives = "fd"\n'))
    spec = load_job_spec(spec_path)
    assert spec.estimate.derivatives == "fd"
    first = submit(spec_path)
    checkpoint = spec.output.checkpoint
    deadline = time.monotonic() + 180
    # Cancel once the checkpoint holds a few evaluations, so that resuming has work to save.
    while not checkpoint.exists() or _evaluations(checkpoint) < 3:
        state = job_state(first["job_id"])
        assert state not in TERMINAL, f"the job ended ({state}) before its first checkpoint:\n{first['log'].read_text()}"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    subprocess.run(["scancel", first["job_id"]], check=True)
    assert wait_for_job(first["job_id"]) == "CANCELLED"
    assert not spec.output.results.exists(), "the job finished before it was cancelled; make it larger"
    at_cancel = json.loads(checkpoint.read_text())

    second = submit(spec_path)
    state = wait_for_job(second["job_id"], timeout=180)
    log = second["log"].read_text()
    assert state == "COMPLETED", log
    assert "resuming from" in log
    resumed = json.loads(spec.output.results.read_text())
    assert resumed["resumed"]["evaluations_before"] >= at_cancel["evaluations"] >= 3

    fresh_spec = load_job_spec(local_copy(spec_path, "fresh"))
    assert run_job(fresh_spec) == 0
    fresh = json.loads(fresh_spec.output.results.read_text())
    assert resumed["evaluations"] < fresh["evaluations"]
    assert_same_estimate(resumed, fresh, rtol=1e-6)
    print(f"\ncancelled with a checkpoint at {at_cancel.get('evaluations')} evaluations; resumed run "
          f"{resumed['evaluations']} evaluations vs fresh {fresh['evaluations']}; "
          f"max rel diff {np.max(np.abs(np.subtract(resumed['params'], fresh['params']) / np.abs(fresh['params']))):.2e}")


def test_sbatch_error_comes_back_as_one_line(slurm, tmp_path):
    spec_path = spec_in(tmp_path, JOBS / "slurm.toml")
    spec_path.write_text(spec_path.read_text().replace('partition = "debug"', 'partition = "nosuch"'))
    done = subprocess.run([sys.executable, "-m", "estpipe", "submit", str(spec_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("estpipe: error: sbatch refused ") and "invalid partition" in line.lower()


@pytest.fixture
def worker_logs(tmp_path):
    return tmp_path / "worker-logs"


def test_jobqueue_worker_above_node_memory_is_reported_at_once(slurm, worker_logs):
    from estpipe.execution.jobqueue import JobQueue

    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"Slurm refused the dask worker job: .*(Memory|node configuration)"):
        JobQueue("slurm", 1, 60, memory="100TB", queue="debug", log_dir=worker_logs, interface="lo",
                 scheduler_host="127.0.0.1").start()
    assert time.perf_counter() - t0 < 20


def test_jobqueue_worker_that_cannot_start_in_time_is_reported_with_its_reason(slurm, worker_logs):
    from estpipe.execution.jobqueue import JobQueue

    cpus = int(re.search(r"CPUTot=(\d+)", subprocess.run(["scontrol", "show", "node", "localhost"], capture_output=True, text=True).stdout).group(1))
    t0 = time.perf_counter()
    # Two jobs of every CPU each: the second waits for resources that free only when the first ends.
    with pytest.raises(UserError, match=r"only [01] of 2 dask worker jobs connected within 10 s: .*PENDING \((Resources|Priority)\)"):
        JobQueue("slurm", 2, 10, cores=cpus, memory="500MB", queue="debug", log_dir=worker_logs, interface="lo",
                 scheduler_host="127.0.0.1").start()
    assert time.perf_counter() - t0 < 40
    # Nothing is left behind in the queue.
    deadline = time.monotonic() + 20
    while subprocess.run(["squeue", "-h", "-n", "dask-worker"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "worker jobs left in the queue"
        time.sleep(0.25)


def test_estimate_with_jobqueue_slurm_equals_in_process(slurm, tmp_path, monkeypatch):
    from estpipe.data.simulate import simulate_choice_data

    data = tmp_path / "data.h5"
    simulate_choice_data(data, sets=500, alternatives=(10, 10), params=4, moments=8, seed=3)
    # Where dask-jobqueue puts the worker logs and which network it uses come from dask's config.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__INTERFACE", "lo")
    import dask.config

    dask.config.refresh()
    try:
        remote = estimate(data, EstimateOptions(jobqueue="slurm", workers=2))
    finally:
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__INTERFACE")
        dask.config.refresh()
    local = estimate(data, EstimateOptions())
    assert remote.telemetry.workers == 2 and "slurm" in remote.telemetry.backend
    np.testing.assert_allclose(remote.params, local.params, rtol=1e-8)
    assert shutil.which("squeue")


def test_estimate_jobqueue_waits_connect_timeout_and_says_why(slurm, tmp_path):
    """`estimate --jobqueue slurm --workers 2 --connect-timeout 8` with worker jobs of every CPU
    each: the second cannot start while the first runs. The wait ends after --connect-timeout
    (formerly a fixed 120 s) with one line and Slurm's reason, and nothing stays queued."""
    from estpipe.data.simulate import simulate_choice_data

    data = tmp_path / "data.h5"
    simulate_choice_data(data, sets=200, alternatives=(3, 3), params=2, moments=3, seed=3)
    cpus = re.search(r"CPUTot=(\d+)", subprocess.run(["scontrol", "show", "node", "localhost"], capture_output=True, text=True).stdout).group(1)
    env = dict(os.environ, DASK_JOBQUEUE__SLURM__INTERFACE="lo", DASK_JOBQUEUE__SLURM__CORES=cpus,
               DASK_JOBQUEUE__SLURM__MEMORY="500MB", DASK_JOBQUEUE__SLURM__QUEUE="debug")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(data), "--jobqueue", "slurm", "--workers", "2",
                           "--connect-timeout", "8"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    seconds = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("estpipe: error:")]
    assert len(errors) == 1 and re.match(r"estpipe: error: only [01] of 2 dask worker jobs connected within 8 s: "
                                         r".*PENDING \((Resources|Priority)\)", errors[0]), done.stderr
    assert seconds < 40, seconds
    deadline = time.monotonic() + 20
    while subprocess.run(["squeue", "-h", "-n", "dask-worker"], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "worker jobs left in the queue"
        time.sleep(0.25)


@pytest.mark.parametrize("dashboard", [False, True], ids=["default", "dashboard"])
def test_a_submitted_jobs_dashboard_is_off_unless_asked_and_on_the_nodes_loopback(slurm, tmp_path, dashboard):
    """By default the job's log says nothing of a dashboard; with [backend] dashboard = true its
    scheduler serves one on the node's loopback, and the log says where and through which ssh
    tunnel. (The job runs this estpipe: its folder on PYTHONPATH through the spec's setup.)"""
    import estpipe

    here = Path(estpipe.__file__).resolve().parents[1]
    setup = f'setup = ["export PYTHONPATH={here}"]' + ("\ndashboard = true" if dashboard else "")
    (tmp_path / "slurm.toml").write_text((JOBS / "slurm.toml").read_text().replace("setup = []", setup))
    job = submit(spec_in(tmp_path, tmp_path / "slurm.toml"))
    state = wait_for_job(job["job_id"])
    log = job["log"].read_text()
    assert state == "COMPLETED", log
    if not dashboard:
        assert "dashboard" not in log, log
        return
    match = re.search(r"estpipe: dashboard: on (\S+) at 127\.0\.0\.1:(\d+) only; from your machine: "
                      r"ssh -L (\d+):localhost:(\d+) (\S+), then open http://localhost:(\d+)/status", log)
    assert match and len({match[2], match[3], match[4], match[6]}) == 1 and match[1] == match[5], log


def test_jobqueue_dashboard_answers_during_the_run(slurm, tmp_path, monkeypatch):
    """--jobqueue slurm --dashboard: the scheduler (in this process) serves the dashboard on
    loopback; the URL of the log line answers 200 while the workers (batch jobs) compute."""
    import urllib.request

    import psutil

    from estpipe.data.simulate import simulate_choice_data
    from estpipe.orchestration import Reporter

    data = tmp_path / "data.h5"
    simulate_choice_data(data, sets=300, alternatives=(5, 5), params=3, moments=6, seed=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__INTERFACE", "lo")
    import dask.config

    dask.config.refresh()

    class Probe(Reporter):
        lines, found = [], None

        def log(self, message):
            self.lines.append(message)

        def iteration(self, record):
            if self.found is None:
                url = next(m[1] for line in self.lines if (m := re.match(r"dashboard: (http://\S+/status) ", line)))
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                bound = {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
                with urllib.request.urlopen(url, timeout=10) as response:
                    self.found = (url, response.status, bound)

    probe = Probe()
    try:
        estimate(data, EstimateOptions(jobqueue="slurm", workers=1, steps=1, dashboard=True), reporter=probe)
    finally:
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__INTERFACE")
        dask.config.refresh()
    url, status, bound = probe.found
    assert url.startswith("http://127.0.0.1:") and status == 200 and bound == {"127.0.0.1"}, probe.found
