"""Partitioning: contiguous, covering, aligned to set and cluster boundaries, balanced by rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from estpipe.execution.planning import default_partitions, plan_partitions


def _offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=300),
    n_partitions=st.integers(1, 12),
    cluster_len=st.one_of(st.none(), st.integers(1, 25)),
)
def test_partitions_cover_contiguously_and_respect_clusters(sizes, n_partitions, cluster_len):
    offsets = _offsets(sizes)
    n = len(sizes)
    cluster = None if cluster_len is None else np.arange(n) // cluster_len
    parts = plan_partitions(offsets, n_partitions, cluster)
    assert 1 <= len(parts) <= n_partitions
    assert parts[0].start == 0 and parts[-1].stop == n
    for a, b in zip(parts[:-1], parts[1:]):
        assert a.stop == b.start
    for i, p in enumerate(parts):
        assert p.index == i and p.stop > p.start
        assert (p.row_start, p.row_stop) == (offsets[p.start], offsets[p.stop])
        if cluster is not None and p.start > 0:
            assert cluster[p.start] != cluster[p.start - 1], "a cut splits a cluster"


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=200, max_size=400), n_partitions=st.integers(2, 7))
def test_partitions_are_balanced_by_rows(sizes, n_partitions):
    offsets = _offsets(sizes)
    parts = plan_partitions(offsets, n_partitions)
    assert len(parts) == n_partitions
    target = offsets[-1] / n_partitions
    # each cut is the set boundary nearest its target row, so no part is off by more than two sets
    for p in parts:
        assert abs(p.n_rows - target) <= 2 * max(sizes)


def test_fewer_clusters_than_partitions_gives_one_partition_per_cluster():
    offsets = _offsets([3] * 30)
    cluster = np.repeat([7, 8, 9], 10)
    parts = plan_partitions(offsets, 7, cluster)
    assert [(p.start, p.stop) for p in parts] == [(0, 10), (10, 20), (20, 30)]


@pytest.mark.parametrize(("workers", "expected"), [pytest.param(1, 1, id="in-process"), pytest.param(3, 3, id="three-workers-one-each")])
def test_default_partitions(workers, expected):
    assert default_partitions(workers) == expected
