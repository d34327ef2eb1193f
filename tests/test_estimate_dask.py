"""The dask back end: equal to in-process for any partitioning, only sums leave the workers, and a
killed worker's partitions are rebuilt with the run going on to the same estimate.

One LocalCluster of 2 worker processes serves the whole module (start-up costs seconds); the
tests reach it the way users reach an existing cluster, with --scheduler ADDRESS.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from estpipe.data.format import ChoiceDataFile
from estpipe.data.problem import read_problem
from estpipe.execution import InProcessEvaluator, plan_partitions, start_backend
from estpipe.orchestration import EstimateOptions, Reporter, estimate
from estpipe.data.simulate import simulate_choice_data

K, M = 4, 8


@contextlib.contextmanager
def local_cluster(n_workers: int):
    """A LocalCluster of n_workers processes that leaves this process's environment as it found
    it: its nannies write OMP_NUM_THREADS=1 and more into os.environ, and every later child of
    the test process (the Slurm tests' `nproc`, sbatch) would inherit them."""
    from distributed import LocalCluster

    saved = dict(os.environ)
    try:
        # port 0: the scheduler's HTTP server takes 8787 even without a dashboard, and a second
        # cluster warns that it is in use
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as c:
            os.environ.clear()
            os.environ.update(saved)
            yield c
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask") / "clustered.h5"
    simulate_choice_data(path, sets=3000, alternatives=(3, 7), params=K, moments=M, seed=4, cluster_size=10)
    return path


def _evaluator(path, options, n_partitions):
    problem = read_problem(path)
    return start_backend(problem, options, lambda n_workers: plan_partitions(problem.offsets, n_partitions, problem.cluster),
                         log=lambda m: None)


@pytest.mark.parametrize("n_partitions", [pytest.param(p, id=f"{p}-partitions") for p in (1, 3, 7)])
def test_dask_sums_equal_in_process(cluster, data, n_partitions):
    params = np.array([0.3, -0.2, 0.5, 0.1])
    with _evaluator(data, EstimateOptions(), 1) as local:
        assert isinstance(local, InProcessEvaluator)
        ref = local.sums(params, covariance=True)
    with _evaluator(data, EstimateOptions(scheduler=cluster.scheduler_address), n_partitions) as ev:
        assert len(ev.partitions) == n_partitions
        out = ev.sums(params, covariance=True)
        pb = ev.pullback(params, np.arange(M, dtype=float))
    np.testing.assert_allclose(out.gG, ref.gG, rtol=1e-10)
    np.testing.assert_allclose(out.S, ref.S, rtol=1e-10)
    assert out.n_units == ref.n_units == 300  # clusters of 10 sets stay whole
    np.testing.assert_allclose(out.loglik, ref.loglik, rtol=1e-10)
    np.testing.assert_allclose(pb, ref.gG[:, 1:].T @ np.arange(M), rtol=1e-10)


def test_only_sums_leave_the_workers(cluster, data):
    """Per evaluation the workers send about P * M * (1 + K) floats (plus S's sums), not rows:
    measured by dask's own outgoing-bytes counters and by the pickled size of what came back."""
    from distributed import Client

    with ChoiceDataFile(data) as f:
        data_bytes = 8 * f.n_rows * (f.K + f.M)
    P = 7
    with _evaluator(data, EstimateOptions(scheduler=cluster.scheduler_address), P) as ev, \
            Client(cluster.scheduler_address, set_as_default=False) as c:
        ev.sums(np.zeros(K))  # warm up
        before = c.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total)
        n_eval = 5
        for i in range(n_eval):
            ev.sums(np.full(K, 0.01 * i), jacobian=True, covariance=False)
        after = c.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total)
        sent = sum(after[w] - before.get(w, 0) for w in after) / n_eval
        pickled = ev.stats.last_result_bytes
    block = 8 * M * (1 + K)
    assert 0 < sent <= P * (block + 1024), sent
    assert P * block <= pickled <= P * (block + 2048), pickled
    assert sent < data_bytes / 100 and pickled < data_bytes / 100


class _UnpicklableSums:
    """A partition's kernel that answers as the one it wraps, with sums that hold a lock (which
    pickle refuses)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def evaluate(self, request):
        out = self.kernel.evaluate(request)
        out.lock = threading.Lock()
        self.calls += 1
        return out


def test_in_process_results_are_never_pickled(data):
    """In-process, results never leave the process: nothing pickles them to count their bytes
    (a result holding a lock still comes back), and the telemetry says 0 bytes came back."""
    params = np.array([0.3, -0.2, 0.5, 0.1])
    with _evaluator(data, EstimateOptions(), 2) as ev:
        assert isinstance(ev, InProcessEvaluator) and len(ev.residents) == 2
        ref = ev.sums(params, covariance=True)
        for resident in ev.residents:
            resident.kernel = _UnpicklableSums(resident.kernel)
        out = ev.sums(params, covariance=True)
        assert [r.kernel.calls for r in ev.residents] == [1, 1]
        assert ev.stats.evaluations == 2 and ev.stats.result_bytes == ev.stats.last_result_bytes == 0
    np.testing.assert_array_equal(out.gG, ref.gG)
    np.testing.assert_array_equal(out.S, ref.S)


class _KillAWorker(Reporter):
    """Kills one worker process (SIGKILL, no goodbye) at the first accepted iteration."""

    def __init__(self, address):
        self.address, self.killed, self.iterations_after = address, None, 0

    def iteration(self, record):
        if self.killed is None:
            from distributed import Client

            with Client(self.address, set_as_default=False) as c:
                pids = c.run(os.getpid)
            worker, pid = sorted(pids.items())[0]
            os.kill(pid, signal.SIGKILL)
            self.killed = (worker, pid)
            time.sleep(0.2)
        else:
            self.iterations_after += 1


def test_killed_worker_gives_the_same_estimate(cluster, data):
    reference = estimate(data, EstimateOptions())
    reporter = _KillAWorker(cluster.scheduler_address)
    r = estimate(data, EstimateOptions(scheduler=cluster.scheduler_address, partitions=4), reporter=reporter)
    assert reporter.killed is not None and reporter.iterations_after >= 3
    from distributed import Client

    with Client(cluster.scheduler_address, set_as_default=False) as c:
        assert reporter.killed[1] not in c.run(os.getpid).values()
    assert r.converged
    np.testing.assert_allclose(r.params, reference.params, rtol=1e-8)
    np.testing.assert_allclose(r.std_errors, reference.std_errors, rtol=1e-6)
    assert r.se_type == "clustered" and r.n_clusters == 300


def test_evaluations_run_where_their_partitions_live(cluster, data):
    """No partition is copied to another worker, however many evaluations run. Unrestricted,
    a few evaluation tasks over few partitions turn "root-ish" for the scheduler once the
    evaluations add up, and it sent them to any idle worker, which fetched the partition."""
    from distributed import Client

    def received(dask_worker):
        return sum(d.get("total", 0) for d in dask_worker.transfer_incoming_log)

    with Client(cluster.scheduler_address, set_as_default=False) as c:
        # The killed-worker test before this one leaves the nanny restarting that worker.
        c.wait_for_workers(2, timeout=60)
    with _evaluator(data, EstimateOptions(scheduler=cluster.scheduler_address), 2) as ev, \
            Client(cluster.scheduler_address, set_as_default=False) as c:
        before = c.run(received)
        holders = dict(ev.client.who_has(ev.residents))
        assert len({h for hs in holders.values() for h in hs}) == 2  # one partition per worker
        for i in range(12):  # the task group grows past 2x the threads after 2 evaluations
            ev.sums(np.full(K, 0.01 * i), jacobian=True, covariance=(i % 4 == 0))
        after = c.run(received)
        assert dict(ev.client.who_has(ev.residents)) == holders
    assert sum(after.values()) - sum(before.get(w, 0) for w in after) == 0


def test_partition_buffers_are_ordinary_arrays():
    """populated_empty: writable C-contiguous arrays of the asked shape, which pickle (a rebuilt
    or moved partition travels as plain arrays), large and small."""
    import pickle

    from estpipe.execution.tasks import POPULATE_MIN_BYTES, populated_empty

    for rows in (10, POPULATE_MIN_BYTES // (8 * 40) + 1):
        a = populated_empty((rows, 40))
        assert a.shape == (rows, 40) and a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
        a[:] = np.arange(40)
        b = pickle.loads(pickle.dumps(a))
        np.testing.assert_array_equal(b, a)


def test_existing_cluster_gets_one_partition_per_worker(data):
    """--scheduler / --scheduler-file (every `submit` script): by default one partition per worker
    present when the run starts, so no worker of a 3-worker job sits idle."""
    with local_cluster(3) as c:
        r = estimate(data, EstimateOptions(scheduler=c.scheduler_address, steps=1))
    assert (r.telemetry.workers, r.telemetry.partitions) == (3, 3)
    assert "3 partitions" in r.telemetry.backend


BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "__DASK_PARENT_PID")


def test_an_estimate_with_workers_leaves_the_environment_alone(data, monkeypatch):
    """--workers 2 starts a LocalCluster, whose nannies set their pre-spawn variables in the calling
    process; afterwards os.environ is as before and a child process sees every core."""
    for name in BLAS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    r = estimate(data, EstimateOptions(workers=2, steps=1))
    assert r.telemetry.workers == 2
    assert dict(os.environ) == before
    cores = len(os.sched_getaffinity(0))
    assert subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() == str(cores)


def test_a_run_with_workers_prints_only_estpipe_lines(data, tmp_path):
    """stderr of `estimate --workers 3` is estpipe's progress and nothing of dask's: no warning
    that port 8787 is taken (here by this test; on a shared machine by anyone's cluster), no
    traceback of a heartbeat cut short by the close."""
    import socket

    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 8787))
        taken.listen()
    except OSError:
        pass  # someone else holds it, which is the same test
    try:
        proc = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(data), "--workers", "3", "--steps", "1",
                               "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    finally:
        taken.close()
    assert proc.returncode == 0, proc.stderr
    others = [line for line in proc.stderr.splitlines() if not line.startswith(("estpipe: ", "step "))]
    assert others == [], proc.stderr


class _Worker:
    def __init__(self, status):
        self.status = status


def _record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, args, None)


def test_worker_log_filter():
    """What the workers of estpipe's own cluster keep off its stderr: a UserError's "Compute
    Failed", and anything once the worker is closing; everything else passes."""
    from distributed.core import Status

    from estpipe.execution.dask_backend import _WorkerLogFilter

    heartbeat = _record("Failed to communicate with scheduler during heartbeat.")
    user_error = _record("Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %r\nTraceback: %r\n",
                         "k", "executing", "t", "UserError('f.h5: dataset X ...')", "tb")
    other_error = _record("Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %r\nTraceback: %r\n",
                          "k", "executing", "t", "ValueError('bug')", "tb")
    running, closing = _WorkerLogFilter(_Worker(Status.running)), _WorkerLogFilter(_Worker(Status.closing))
    assert running.filter(heartbeat) and running.filter(other_error) and not running.filter(user_error)
    assert not closing.filter(heartbeat) and not closing.filter(other_error)
