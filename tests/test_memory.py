"""The memory check charges each partition the kernel buffers it really gets (min(its rows, the
tile rows), measured on the kernel), and surplus workers are capped at one per partition the
file can have, with a note."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from estpipe.data.format import read_choice_data
from estpipe.execution.memory import PROCESS_BYTES, kernel_buffer_bytes, plan_memory
from estpipe.execution.planning import plan_partitions
from estpipe.errors import cli_flag, vocabulary
from estpipe.orchestration import EstimateOptions
from estpipe.orchestration.estimate import _cap_workers
from estpipe.kernel import PartitionKernel
from estpipe.data.simulate import simulate_choice_data


@pytest.mark.parametrize(
    ("alternatives", "model", "derivatives", "threads"),
    [
        pytest.param((2, 30), "logit", "dual", 1, id="sizes-2-30-dual"),
        pytest.param((2, 30), "logit", "dual", 2, id="sizes-2-30-dual-2-threads"),
        pytest.param((2, 2), "logit", "dual", 2, id="sizes-2-dual"),
        pytest.param((30, 30), "logit", "dual", 1, id="sizes-30-dual"),
        pytest.param((2, 30), "logit-signed", "dual", 2, id="generic-model"),
        pytest.param((2, 30), "logit", "adjoint", 2, id="adjoint"),
        pytest.param((2, 3), "logit", "fd", 1, id="finite-differences"),
    ],
)
def test_buffer_charge_bounds_the_kernels_real_workspace(tmp_path, alternatives, model, derivatives, threads):
    """After every kind of evaluation an estimate makes, the workspaces hold no more than the
    charge, and the charge is not far above them (it assumes the most sets per tile)."""
    path = tmp_path / "d.h5"
    simulate_choice_data(path, sets=3000, alternatives=alternatives, params=5, moments=10, seed=1, cluster_size=7)
    data = read_choice_data(path)
    kernel = PartitionKernel(data, model=model, derivatives=derivatives, threads=threads)
    b = np.full(kernel.n_params, 0.01)
    kernel.sums(b, jacobian=True, covariance=True)
    kernel.sums(b, jacobian=True)
    kernel.sums(b, jacobian=False)
    kernel.pullback(b, np.ones(data.M))
    charged = kernel_buffer_bytes(data.n_rows, data.K, data.M, model, derivatives, threads)
    assert kernel.buffer_nbytes <= charged <= 4 * kernel.buffer_nbytes + 2**20, (kernel.buffer_nbytes, charged)


def test_a_small_partition_is_charged_buffers_for_its_own_rows():
    """Formerly 64 MiB for any partition, so --workers 1000 on a tiny file 'needed' 209 GiB."""
    small, large = kernel_buffer_bytes(200, 20, 40), kernel_buffer_bytes(10**7, 20, 40)
    assert small < 2**20 < large
    assert kernel_buffer_bytes(10**7, 20, 40) == kernel_buffer_bytes(10**8, 20, 40)  # one tile's worth at most
    offsets = np.arange(0, 30 * 1001, 30)
    parts = plan_partitions(offsets, 1000)
    plan = plan_memory(parts, list(range(1000)), 1000, 20, 40, True, False, new_processes=True)
    assert plan.total < 1000 * (PROCESS_BYTES + 2**20)


def test_surplus_workers_are_capped_at_one_per_set_or_cluster():
    notes = []
    with vocabulary(cli_flag):  # the note as the command line spells it
        capped = _cap_workers(EstimateOptions(workers=1000), 3, None, notes.append)
    assert capped.workers == 3 and notes == ["note: --workers 1000 is more than the 3 partitions this file can have "
                                             "(one set each); starting 3 workers"]
    capped = _cap_workers(EstimateOptions(workers=8), 40, np.repeat([5, 6], 20), notes.append)
    assert capped.workers == 2 and "one cluster each" in notes[-1]
    assert _cap_workers(EstimateOptions(workers=2), 40, None, notes.append).workers == 2 and len(notes) == 2


def test_workers_1000_on_a_tiny_file_runs_with_as_many_workers_as_clusters(tmp_path):
    data, out = tmp_path / "tiny.h5", tmp_path / "results.json"
    simulate_choice_data(data, sets=200, alternatives=(4, 4), params=2, moments=3, seed=4, cluster_size=100)
    done = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(data), "--workers", "1000", "--no-cluster", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "note: --workers 1000 is more than the 2 partitions this file can have (one cluster each); starting 2 workers" in done.stderr
    results = json.loads(out.read_text())
    assert results["workers"] == 2 and results["partitions"] == 2
