"""`estpipe estimate --scheduler-file` against a real `dask scheduler` and two `dask worker`
processes; one worker is killed after the first evaluation, before convergence: same estimate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from estpipe.orchestration import EstimateOptions, estimate
from estpipe.data.simulate import simulate_choice_data

pytestmark = pytest.mark.slow


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # Own session: killing the group ends a worker's nanny and its worker process together.
    return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-process workers on loopback; yields (scheduler_file, workers)."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = _start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                        "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert scheduler.poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.1)
        workers = [
            _start(["worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1", "--nthreads", "1",
                    "--no-dashboard", "--host", "127.0.0.1"], tmp_path / f"worker{i}.log")
            for i in range(2)
        ]
        done = subprocess.run([sys.executable, "-m", "estpipe.jobs.workers", str(scheduler_file), "2", "--timeout", "60"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield scheduler_file, workers
    finally:
        for proc in workers:
            _stop(proc)
        _stop(scheduler)


def test_estimate_survives_a_killed_worker(tmp_path, dask_cluster):
    scheduler_file, workers = dask_cluster
    data = tmp_path / "data.h5"
    simulate_choice_data(data, sets=10000, alternatives=(30, 30), params=20, moments=40, seed=5)
    out = tmp_path / "results.json"
    # About 14 evaluations of 50 to 100 ms each follow the first: the kill lands mid-run.
    estimate_proc = subprocess.Popen(
        [sys.executable, "-m", "estpipe", "estimate", str(data), "--scheduler-file", str(scheduler_file),
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    progress = []
    for line in estimate_proc.stderr:
        progress.append(line)
        if "step 1 iter   1 " in line:
            os.killpg(workers[0].pid, signal.SIGKILL)
            workers[0].wait()
            break
    else:
        pytest.fail("estimate ended before its first evaluation:\n" + "".join(progress))
    _, after_kill = estimate_proc.communicate(timeout=300)
    assert estimate_proc.returncode == 0, "".join(progress) + after_kill
    # The kill came before convergence: the run went on evaluating afterwards.
    assert "step 1 iter   2 " in after_kill and "step 2 iter" in after_kill
    remote = json.loads(out.read_text())

    local = estimate(data, EstimateOptions())
    assert remote["converged"] and local.converged
    np.testing.assert_allclose(remote["params"], local.params, rtol=1e-8)
    np.testing.assert_allclose(remote["std_errors"], local.std_errors, rtol=1e-6)
