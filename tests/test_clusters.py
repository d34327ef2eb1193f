"""One way to get a cluster and one rule to wait for its workers (execution/clusters.py): wait
until the number of workers asked for has joined (an existing cluster: at least one, then use all
present), bounded by the timeout, ending with the batch system's reason when it has one.

The schedulers here are real dask schedulers on loopback (in this process, without workers of
their own); the workers that join are real `dask worker` processes. The batch-system side is in
tests/test_slurm.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from estpipe.errors import UserError
from estpipe.execution.backends import BACKENDS, backend_name, cluster_for
from estpipe.execution.clusters import Existing, InProcess, Local, wait_for_workers
from estpipe.orchestration import EstimateOptions
from conftest import write_huge_file


@contextlib.contextmanager
def scheduler_only():
    """A dask scheduler with no workers, running in this process, on loopback."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as c:
        yield c.scheduler_address


@contextlib.contextmanager
def dask_workers(address: str, n: int, tmp_path):
    """n `dask worker` processes joining `address` (each in its own session, stopped at the end)."""
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nworkers", "1", "--nthreads", "1",
                               "--no-dashboard", "--host", "127.0.0.1"],
                              stdout=(tmp_path / f"worker{i}.log").open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
             for i in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_an_existing_cluster_without_workers_fails_at_the_timeout_naming_the_address():
    with scheduler_only() as address:
        cluster = Existing(address, None, timeout=2)
        t0 = time.monotonic()
        with pytest.raises(UserError) as raised:
            cluster.start()
        waited = time.monotonic() - t0
    assert str(raised.value) == (f"the dask scheduler at {address} has no workers (waited 2 s); start some with "
                                 f"`dask worker {address}`")
    assert 2 <= waited < 5, waited  # the whole wait, connecting included, is bounded by the timeout
    assert cluster.client is None  # closed again


@pytest.mark.parametrize("content", [pytest.param(b"\x89HDF\r\n\x1a\n\x00", id="binary"),
                                     pytest.param(b'{"adress": "tcp://127.0.0.1:1"}', id="no-address"),
                                     pytest.param(b"tcp://127.0.0.1:1", id="not-json")])
def test_a_file_that_is_not_a_scheduler_file_is_one_line(tmp_path, content):
    path = tmp_path / "scheduler.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"scheduler\.json: not a dask scheduler file \(expected JSON with an \"address\"\)"):
        Existing(None, str(path), timeout=1).start()


def test_an_existing_cluster_is_used_once_its_first_worker_has_joined(tmp_path):
    """The worker process takes a few seconds to start: the wait lasts until it has joined."""
    with scheduler_only() as address, dask_workers(address, 1, tmp_path):
        cluster = Existing(address, None, timeout=60)
        cluster.start()
        try:
            assert cluster.workers() and cluster.description == f"dask cluster at {address}, 1 worker"
        finally:
            cluster.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """The address of a scheduler with two `dask worker` processes joined."""
    from distributed import Client

    with scheduler_only() as address, dask_workers(address, 2, tmp_path_factory.mktemp("workers")):
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield address


def test_with_two_workers_present_both_are_used(two_workers):
    cluster = Existing(two_workers, None, timeout=10)
    cluster.start()
    try:
        assert len(cluster.workers()) == 2 and cluster.description.endswith(", 2 workers")
        assert [len(pool.workers) for pool in cluster.available_memory()] == [1, 1]  # one pool per worker
    finally:
        cluster.close()


def test_a_worker_that_cannot_hold_its_partitions_is_named(two_workers, tmp_path):
    """The one memory check, per worker of an existing cluster: 10^10 rows (a sparse file) in two
    partitions of 149.01 GiB of data each, one per worker."""
    import h5py
    import numpy as np

    from estpipe.orchestration import estimate

    huge = write_huge_file(tmp_path / "huge.h5")
    with pytest.raises(UserError, match=r"^the data will not fit in memory: worker tcp://127\.0\.0\.1:\d+ needs about "
                                        r"[\d.]+ GiB \(149\.01 GiB of data plus buffers\), but only [\d.]+ GiB is "
                                        r"available; add workers or machines \(or give each worker more memory\)$"):
        estimate(huge, EstimateOptions(scheduler=two_workers, steps=1))


def test_workers_asked_for_that_do_not_join_end_with_the_reason():
    from distributed import Client

    with scheduler_only() as address, Client(address, set_as_default=False) as client:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"^only 0 of 2 workers joined within 1 s: job 7 PENDING \(Resources\)$"):
            wait_for_workers(client, 2, 1, lambda seen: f"only {seen} of 2 workers joined within 1 s",
                             reason=lambda: "job 7 PENDING (Resources)")
        assert 1 <= time.monotonic() - t0 < 3
        # a refusal ends the wait at once, whatever the timeout
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"^slurm refused a dask worker job: invalid partition$"):
            wait_for_workers(client, 2, 60, lambda seen: "not this", refused=lambda: "slurm refused a dask worker job: invalid partition")
        assert time.monotonic() - t0 < 1


def test_the_batch_scripts_wait_fails_with_one_line(tmp_path):
    """`python -m estpipe.jobs.workers` (every rendered batch script runs it before estimate)."""
    scheduler_file = tmp_path / "scheduler.json"
    with scheduler_only() as address:
        scheduler_file.write_text(json.dumps({"address": address}))
        done = subprocess.run([sys.executable, "-m", "estpipe.jobs.workers", str(scheduler_file), "2", "--timeout", "2"],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"estpipe: error: only 0 of 2 dask workers joined {scheduler_file} within 2 s; "
                                        "see the job log for why the others did not start"]


@pytest.mark.parametrize(("options", "name", "kind"), [
    pytest.param(EstimateOptions(), "local", InProcess, id="in-process"),
    pytest.param(EstimateOptions(workers=3), "local", Local, id="local-cluster"),
    pytest.param(EstimateOptions(scheduler="tcp://127.0.0.1:9"), "dask", Existing, id="scheduler"),
    pytest.param(EstimateOptions(scheduler_file="s.json"), "dask", Existing, id="scheduler-file"),
    pytest.param(EstimateOptions(jobqueue="pbs", workers=2), "pbs", None, id="jobqueue"),
])
def test_the_options_choose_a_back_end_by_its_job_spec_name(options, name, kind):
    from estpipe.execution.jobqueue import JobQueue

    assert backend_name(options) == name and name in BACKENDS
    cluster = cluster_for(options)  # nothing is started
    assert isinstance(cluster, kind or JobQueue) and cluster.client is None
    assert BACKENDS.names == ("local", "dask", "slurm", "pbs")
