"""The choice-data format v1: round trips through the writer and the range reader, and every kind
of bad file gets its own message (from the reader and through `estpipe inspect`)."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estpipe.cli.app import main
from estpipe.data.format import ChoiceData, ChoiceDataFile, ChoiceDataWriter, read_choice_data, write_choice_data
from estpipe.errors import UserError


def _random_data(rng, sizes, K, M, with_chosen, cluster_sizes):
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    rows = int(offsets[-1])
    chosen = None
    if with_chosen:
        chosen = np.zeros(rows, dtype=np.int8)
        chosen[offsets[:-1] + rng.integers(0, np.asarray(sizes))] = 1
    cluster = None
    if cluster_sizes is not None:
        # Contiguous clusters with arbitrary (not sorted) ids, as `estpipe load` may write them.
        ids = rng.permutation(len(cluster_sizes)) * 7 + 3
        cluster = np.repeat(ids, cluster_sizes).astype(np.int64)
    return ChoiceData(rng.standard_normal((rows, K)), rng.standard_normal((rows, M)), offsets, chosen, cluster)


@st.composite
def choice_data_cases(draw):
    n_sets = draw(st.integers(1, 40))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n_sets, max_size=n_sets))
    K = draw(st.integers(1, 4))
    M = draw(st.integers(K, K + 3))
    with_chosen = draw(st.booleans())
    cluster_sizes = None
    if draw(st.booleans()):
        cluster_sizes, left = [], n_sets
        while left:
            c = draw(st.integers(1, left))
            cluster_sizes.append(c)
            left -= c
    # Appends split the sets at arbitrary places; the HDF5 row chunk is small so that appends
    # and reads cross chunk boundaries.
    cuts = sorted(set(draw(st.lists(st.integers(1, n_sets), max_size=4))) | {n_sets})
    chunk_rows = draw(st.sampled_from([1, 3, 8, 64]))
    ranges = draw(st.lists(st.tuples(st.integers(0, n_sets), st.integers(0, n_sets)).map(sorted), min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**32 - 1))
    return sizes, K, M, with_chosen, cluster_sizes, cuts, chunk_rows, ranges, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=choice_data_cases())
def test_round_trip_any_range_of_sets(tmp_path_factory, case):
    sizes, K, M, with_chosen, cluster_sizes, cuts, chunk_rows, ranges, seed = case
    data = _random_data(np.random.default_rng(seed), sizes, K, M, with_chosen, cluster_sizes)
    path = tmp_path_factory.mktemp("rt") / "data.h5"
    names, moments = [f"p{k}" for k in range(K)], [f"m{m}" for m in range(M)]
    truth = np.arange(K, dtype=np.float64)
    with ChoiceDataWriter(path, names, moments, provenance={"test": "round trip"}, with_chosen=with_chosen,
                          with_cluster=cluster_sizes is not None, truth=truth, chunk_rows=chunk_rows) as w:
        start = 0
        for stop in cuts:
            r0, r1 = data.offsets[start], data.offsets[stop]
            w.append(
                data.X[r0:r1], data.dm[r0:r1], np.diff(data.offsets[start : stop + 1]),
                chosen=data.chosen[r0:r1] if with_chosen else None,
                cluster=data.cluster[start:stop] if data.cluster is not None else None,
            )
            start = stop
    with ChoiceDataFile(path) as f:
        assert (f.n_sets, f.n_rows, f.K, f.M) == (len(sizes), data.n_rows, K, M)
        assert f.param_names == names and f.moment_names == moments
        assert f.provenance == {"test": "round trip"}
        assert f.has_chosen == with_chosen and f.has_cluster == (cluster_sizes is not None)
        assert np.array_equal(f.truth, truth)
        assert np.array_equal(f.offsets, data.offsets)
        for a, b in ranges:
            part = f.read_sets(a, b)
            r0, r1 = data.offsets[a], data.offsets[b]
            assert part.n_sets == b - a
            assert np.array_equal(part.offsets, data.offsets[a : b + 1] - r0)
            assert np.array_equal(part.X, data.X[r0:r1]) and np.array_equal(part.dm, data.dm[r0:r1])
            assert part.X.dtype == part.dm.dtype == np.float64
            if with_chosen:
                assert np.array_equal(part.chosen, data.chosen[r0:r1])
            else:
                assert part.chosen is None
            if cluster_sizes is not None:
                assert np.array_equal(part.cluster, data.cluster[a:b])
            else:
                assert part.cluster is None
        if cluster_sizes is not None:
            assert np.array_equal(f.read_cluster(), data.cluster)
            assert f.describe()["n_clusters"] == len(cluster_sizes)


def test_write_choice_data_round_trip_and_describe(tmp_path):
    rng = np.random.default_rng(0)
    data = _random_data(rng, [2, 3, 3, 5], 2, 3, True, [1, 3])
    write_choice_data(tmp_path / "d.h5", data, ["a", "b"], ["m1", "m2", "m3"], provenance={"k": 1}, truth=[0.5, -1.0])
    back = read_choice_data(tmp_path / "d.h5")
    for name in ("X", "dm", "offsets", "chosen", "cluster"):
        assert np.array_equal(getattr(back, name), getattr(data, name)), name
    with ChoiceDataFile(tmp_path / "d.h5") as f:
        d = f.describe()
    assert d["set_sizes"] == {"min": 2, "median": 3.0, "mean": 3.25, "max": 5, "counts": {"2": 1, "3": 2, "5": 1}}
    assert d["truth"] == [0.5, -1.0] and d["n_clusters"] == 2 and len(d["fingerprint"]) == 16


def test_written_file_has_the_usual_permissions(tmp_path):
    data = _random_data(np.random.default_rng(0), [2, 2], 1, 1, False, None)
    write_choice_data(tmp_path / "d.h5", data, ["a"], ["m"])
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "d.h5").stat().st_mode & 0o777 == 0o666 & ~mask


def test_fingerprint_changes_with_the_data(tmp_path):
    rng = np.random.default_rng(1)
    data = _random_data(rng, [3] * 10, 2, 2, False, None)
    write_choice_data(tmp_path / "a.h5", data, ["a", "b"], ["m", "n"])
    write_choice_data(tmp_path / "b.h5", data, ["a", "b"], ["m", "n"])
    data.X[-1, -1] += 1.0
    write_choice_data(tmp_path / "c.h5", data, ["a", "b"], ["m", "n"])
    fp = {name: ChoiceDataFile(tmp_path / name).fingerprint() for name in ("a.h5", "b.h5", "c.h5")}
    assert fp["a.h5"] == fp["b.h5"] != fp["c.h5"]


def test_a_writer_that_raises_midway_leaves_nothing(tmp_path):
    rng = np.random.default_rng(2)
    data = _random_data(rng, [3] * 20, 2, 2, True, None)
    with pytest.raises(RuntimeError, match="midway"):
        with ChoiceDataWriter(tmp_path / "out.h5", ["a", "b"], ["m", "n"], with_chosen=True, chunk_rows=4) as w:
            w.append(data.X[:30], data.dm[:30], [3] * 10, chosen=data.chosen[:30])
            assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "rows go to a temporary file"
            raise RuntimeError("midway")
    assert os.listdir(tmp_path) == []


def test_a_writer_that_fails_while_finishing_leaves_nothing(tmp_path):
    # The rows went in; writing truth/params at the end fails.
    with pytest.raises(ValueError):
        with ChoiceDataWriter(tmp_path / "out.h5", ["a"], ["m"], truth=["not a number"]) as w:
            w.append(np.zeros((2, 1)), np.zeros((2, 1)), [2])
    assert os.listdir(tmp_path) == []


# -- bad files -----------------------------------------------------------------------------------
def _good_file(path, n_sets=300):
    rng = np.random.default_rng(3)
    data = _random_data(rng, [4] * n_sets, 3, 4, True, [5] * (n_sets // 5))
    write_choice_data(path, data, ["a", "b", "c"], ["m1", "m2", "m3", "m4"], provenance={"made": "test"})
    return path


def _truncated(path):
    _good_file(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _foreign(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("table", data=np.arange(10))


def _text(path):
    path.write_text("set,choice,x\n1,1,0.5\n")


def _edit(change):
    def make(path):
        _good_file(path)
        with h5py.File(path, "r+") as f:
            change(f)

    return make


def _replace_offsets(values):
    def change(f):
        del f["offsets"]
        f["offsets"] = np.asarray(values, dtype=np.int64)

    return change


def _set_attr(name, value):
    def change(f):
        f.attrs[name] = value

    return change


def _set_cluster(f):
    ids = f["cluster"][...]
    ids[-1] = ids[0]
    f["cluster"][...] = ids


BAD_FILES = [
    pytest.param(_truncated, ["truncated"], id="truncated"),
    pytest.param(_foreign, ["not an estpipe choice-data file", "estpipe_format", "estpipe load"], id="foreign-hdf5"),
    pytest.param(_text, ["not an HDF5 file", "estpipe load"], id="not-hdf5"),
    pytest.param(_edit(_set_attr("estpipe_format_version", 2)), ["format version 2", "reads version 1", "newer"], id="version-2"),
    pytest.param(_edit(_set_attr("estpipe_format", "parquet-ish")), ["not an estpipe choice-data file", "parquet-ish"], id="other-format"),
    pytest.param(_edit(lambda f: f.__delitem__("dm")), ["dataset 'dm' is missing"], id="missing-dm"),
    pytest.param(_edit(lambda f: f.attrs.__delitem__("n_rows")), ["attribute 'n_rows' is missing"], id="missing-attribute"),
    pytest.param(_edit(_replace_offsets([0, 4, 8, 8] + list(range(16, 4 * 300 + 1, 4)))),
                 ["not strictly increasing at set 2", "offsets[2] = 8, offsets[3] = 8"], id="offsets-not-increasing"),
    pytest.param(_edit(_replace_offsets(list(range(0, 4 * 300, 4)) + [4 * 300 - 1])),
                 ["offsets end at 1199", "n_rows = 1200"], id="offsets-not-matching-rows"),
    pytest.param(_edit(_replace_offsets([1] + list(range(4, 4 * 300 + 1, 4)))), ["offsets[0] is 1"], id="offsets-not-from-0"),
    pytest.param(_edit(_replace_offsets(range(0, 4 * 200 + 1, 4))), ["offsets has shape (201,)", "(301,)"], id="offsets-wrong-length"),
    pytest.param(_edit(_set_cluster), ["is split into non-contiguous blocks", "sets start at set 0 and again at set 299"], id="cluster-split"),
]


@pytest.mark.parametrize("make, words", BAD_FILES)
def test_bad_file_gets_its_message(tmp_path, make, words):
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(UserError) as info:
        with ChoiceDataFile(path) as f:
            f.read_sets()
    message = str(info.value)
    assert message.startswith(str(path))
    for w in words:
        assert w in message
    assert "\n" not in message


@pytest.mark.parametrize("make, words", BAD_FILES)
def test_inspect_of_a_bad_file_exits_2_with_one_line(tmp_path, capsys, make, words):
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(path)])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("estpipe: error: ") and "Traceback" not in err
    assert words[0] in err


def test_inspect_of_a_truncated_file_in_a_real_process(tmp_path):
    path = tmp_path / "bad.h5"
    _truncated(path)
    proc = subprocess.run([sys.executable, "-m", "estpipe", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_writer_refuses_a_folder_as_output(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        ChoiceDataWriter(tmp_path, ["a"], ["m"])


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        ChoiceDataFile(tmp_path / "none.h5")
    with pytest.raises(UserError, match="is a folder"):
        ChoiceDataFile(tmp_path)
