"""`estpipe load`: long CSV and Parquet files load to exactly what they hold, across batch
boundaries; the sample data loads; every bad input gets one line, exit code 2 and no file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estpipe.data.format import ChoiceDataFile
from estpipe.errors import UserError, cli_flag, vocabulary
from estpipe.data.load import load_choice_data

REPO = Path(__file__).resolve().parents[1]
MODECHOICE = REPO / "data" / "modechoice.csv"
ESTPIPE = [sys.executable, "-m", "estpipe"]


# -- data written by the tests, and what it must load to, computed with pandas -------------------


def long_frame(rng, n_sets, min_size=2, max_size=6, n_x=3, string_ids=False, clusters=False):
    """A long-format frame: sets of random sizes with shuffled (non-sorted) ids, one chosen row per
    set, x columns x0.., an extra column w, an alternative column and optionally clusters."""
    sizes = rng.integers(min_size, max_size + 1, n_sets)
    raw_ids = rng.permutation(n_sets * 3)[:n_sets] + 1
    ids = [f"s{v}" for v in raw_ids] if string_ids else raw_ids
    frame = pd.DataFrame({"sid": np.repeat(ids, sizes)})
    frame["alt"] = np.concatenate([rng.permutation(max_size)[:k] + 1 for k in sizes])
    choice = np.zeros(sizes.sum(), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    choice[starts + (rng.random(n_sets) * sizes).astype(np.int64)] = 1
    frame["choice"] = choice
    for k in range(n_x):
        frame[f"x{k}"] = rng.normal(size=sizes.sum()).round(6)
    frame["w"] = rng.uniform(size=sizes.sum()).round(6)
    if clusters:
        per_set = np.repeat(np.arange(max(1, n_sets // 3)), 3)[:n_sets]
        per_set = np.concatenate([per_set, np.full(n_sets - per_set.size, per_set[-1] if per_set.size else 0)])
        labels = np.array([f"c{v}" for v in rng.permutation(per_set.max() + 1)])
        frame["cl"] = np.repeat(labels[per_set], sizes)
    return frame


@dataclass
class Expected:
    X: np.ndarray
    dm: np.ndarray
    offsets: np.ndarray
    chosen: np.ndarray
    cluster: np.ndarray | None


def expected(frame, x, z=None, dm=None, asc_levels=(), asc_in_z=True, cluster="cl"):
    """What the loader must write, computed directly with pandas (no code shared with it)."""
    frame = frame.copy()
    for level in asc_levels:
        frame[f"asc_{level}"] = (frame["alt"] == level).astype(float)
    asc_cols = [f"asc_{v}" for v in asc_levels]
    X = frame[x + asc_cols].to_numpy(float)
    if dm is not None:
        D = frame[dm].to_numpy(float)
    else:
        zc = (z or x) + (asc_cols if asc_in_z else [])
        chosen_z = frame[frame["choice"] == 1].set_index("sid")[zc]
        D = frame[zc].to_numpy(float) - chosen_z.loc[frame["sid"]].to_numpy(float)
    sizes = frame.groupby("sid", sort=False).size().to_numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    codes = None
    if cluster in frame:
        per_set = frame.groupby("sid", sort=False)[cluster].first()
        codes = pd.factorize(per_set)[0]
    return Expected(X, D, offsets, frame["choice"].to_numpy(np.int8), codes)


def write(frame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def assert_loaded(out: Path, want: Expected, param_names=None, moment_names=None):
    with ChoiceDataFile(out) as f:
        got = f.read_sets()
        if param_names is not None:
            assert f.param_names == param_names
        if moment_names is not None:
            assert f.moment_names == moment_names
    np.testing.assert_array_equal(got.offsets, want.offsets)
    np.testing.assert_array_equal(got.X, want.X)
    np.testing.assert_allclose(got.dm, want.dm, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.chosen, want.chosen)
    if want.cluster is None:
        assert got.cluster is None
    else:
        np.testing.assert_array_equal(got.cluster, want.cluster)


# -- loads to exactly what the file holds ---------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, string_ids, clusters",
    [
        pytest.param(".csv", False, False, id="csv-integer-ids"),
        pytest.param(".csv", True, True, id="csv-text-ids-clusters"),
        pytest.param(".parquet", False, True, id="parquet-integer-ids-clusters"),
        pytest.param(".parquet", True, False, id="parquet-text-ids"),
    ],
)
def test_load_equals_file_across_batches(tmp_path, suffix, string_ids, clusters):
    frame = long_frame(np.random.default_rng(1), 60, string_ids=string_ids, clusters=clusters)
    path = write(frame, tmp_path / f"in{suffix}")
    summary = load_choice_data(
        path, tmp_path / "out.h5", set_col="sid", choice_col="choice", x="x0,x1,x2",
        cluster_col="cl" if clusters else None, batch_rows=7,
    )
    assert summary.n_batches > 1 and summary.rows_read == len(frame)
    assert_loaded(tmp_path / "out.h5", expected(frame, ["x0", "x1", "x2"]), ["x0", "x1", "x2"], ["x0", "x1", "x2"])
    assert (summary.n_clusters is not None) == clusters


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_sets=st.integers(1, 25),
    max_size=st.integers(2, 7),
    n_x=st.integers(1, 3),
    batch_rows=st.integers(1, 40),
    suffix=st.sampled_from([".csv", ".parquet"]),
)
def test_load_any_shape_and_batch_size(seed, n_sets, max_size, n_x, batch_rows, suffix):
    frame = long_frame(np.random.default_rng(seed), n_sets, max_size=max_size, n_x=n_x, clusters=True)
    x = [f"x{k}" for k in range(n_x)]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(frame, Path(tmp) / f"in{suffix}")
        summary = load_choice_data(
            path, Path(tmp) / "out.h5", set_col="sid", choice_col="choice", x=x, z=x + ["w"],
            cluster_col="cl", batch_rows=batch_rows,
        )
        assert summary.n_batches == -(-len(frame) // batch_rows) or suffix == ".csv"
        assert_loaded(Path(tmp) / "out.h5", expected(frame, x, z=x + ["w"]), x, x + ["w"])


def test_instruments_dm_and_constants(tmp_path):
    frame = long_frame(np.random.default_rng(2), 40, max_size=5)
    path = write(frame, tmp_path / "in.csv")
    out = tmp_path / "out.h5"

    load_choice_data(path, out, set_col="sid", choice_col="choice", x="x0", z="x0,x1,w", batch_rows=5)
    assert_loaded(out, expected(frame, ["x0"], z=["x0", "x1", "w"]), ["x0"], ["x0", "x1", "w"])

    load_choice_data(path, out, set_col="sid", choice_col="choice", x="x0,x1", dm="x1,x2,w", batch_rows=5)
    assert_loaded(out, expected(frame, ["x0", "x1"], dm=["x1", "x2", "w"]), ["x0", "x1"], ["x1", "x2", "w"])

    summary = load_choice_data(path, out, set_col="sid", choice_col="choice", x="x0", alt_col="alt", asc=True, batch_rows=5)
    levels = [2, 3, 4, 5]
    names = ["x0"] + [f"asc_{v}" for v in levels]
    assert summary.asc_levels == ["2", "3", "4", "5"]
    assert_loaded(out, expected(frame, ["x0"], asc_levels=levels), names, names)

    # with --z the constants go to X and to z too (each its own instrument: a user cannot name a
    # constant load makes); --asc-base picks another base
    z = ["x0", "x1", "x2", "w", "alt"]
    load_choice_data(path, out, set_col="sid", choice_col="choice", x="x0", z=z,
                     alt_col="alt", asc=True, asc_base="4", batch_rows=5)
    want = expected(frame, ["x0"], z=z, asc_levels=[1, 2, 3, 5], asc_in_z=True)
    ascs = ["asc_1", "asc_2", "asc_3", "asc_5"]
    assert_loaded(out, want, ["x0", *ascs], z + ascs)
    with pytest.raises(UserError, match="M = 5 .* K = 7"):
        load_choice_data(path, out, set_col="sid", choice_col="choice", x="x0,x1,x2", z="x0",
                         alt_col="alt", asc=True, asc_base="4", batch_rows=5)


@pytest.mark.parametrize(
    "levels, want",
    [
        pytest.param([10, 9, 1, 2], ["2", "9", "10"], id="numbers-numerically"),
        pytest.param(["bus", "air", "car", "train"], ["bus", "car", "train"], id="text-lexically"),
    ],
)
def test_asc_level_order(tmp_path, levels, want):
    frame = pd.DataFrame({"sid": [1, 1, 1, 1], "alt": levels, "choice": [1, 0, 0, 0], "x": [0.5, 1.0, 2.0, 3.0]})
    summary = load_choice_data(write(frame, tmp_path / "in.csv"), tmp_path / "out.h5", set_col="sid",
                               choice_col="choice", x="x", alt_col="alt", asc=True)
    assert summary.param_names == ["x"] + [f"asc_{v}" for v in want]
    with ChoiceDataFile(tmp_path / "out.h5") as f:
        X = f.read_sets().X
    for j, level in enumerate(want):
        np.testing.assert_array_equal(X[:, 1 + j], [str(v) == level for v in levels])


# -- single-alternative sets ----------------------------------------------------------------------


def test_single_alternative_sets_are_dropped(tmp_path):
    frame = long_frame(np.random.default_rng(3), 30, min_size=1, max_size=3, clusters=True)
    sizes = frame.groupby("sid", sort=False).size()
    singles = sizes[sizes == 1]
    assert 1 < len(singles) < len(sizes)
    path = write(frame, tmp_path / "in.csv")
    summary = load_choice_data(path, tmp_path / "out.h5", set_col="sid", choice_col="choice", x="x0,x1",
                               cluster_col="cl", batch_rows=4)
    assert summary.n_dropped_single_sets == len(singles)
    assert summary.first_dropped_set_id == str(singles.index[0])
    kept = frame[frame["sid"].map(sizes) > 1]
    want = expected(kept, ["x0", "x1"])
    # cluster codes count clusters in order of appearance in the whole input, dropped sets included
    all_codes = pd.factorize(frame.groupby("sid", sort=False)["cl"].first())[0]
    want.cluster = all_codes[(sizes > 1).to_numpy()]
    assert_loaded(tmp_path / "out.h5", want)
    with ChoiceDataFile(tmp_path / "out.h5") as f:
        assert f.n_sets == len(sizes) - len(singles)
        assert f.provenance["dropped_single_alternative_sets"] == len(singles)

    run = subprocess.run([*ESTPIPE, "load", str(path), str(tmp_path / "cli.h5"), "--set-col", "sid",
                          "--choice-col", "choice", "--x", "x0,x1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == (f"estpipe: note: dropped {len(singles)} sets with a single alternative "
                                  f"(first: set {singles.index[0]}); they carry no information")


def test_only_single_alternative_sets_is_an_error(tmp_path):
    frame = pd.DataFrame({"sid": [1, 2, 3], "choice": [1, 1, 1], "x": [0.1, 0.2, 0.3]})
    with pytest.raises(UserError, match="every set has a single alternative"):
        load_choice_data(write(frame, tmp_path / "in.csv"), tmp_path / "out.h5", set_col="sid", choice_col="choice", x="x")
    assert os.listdir(tmp_path) == ["in.csv"]


def test_error_after_rows_were_written_leaves_no_file(tmp_path):
    frame = long_frame(np.random.default_rng(4), 50)
    frame.loc[len(frame) - 2, "x1"] = np.inf
    path = write(frame, tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=rf"row {len(frame) - 2} \(0-based\): column x1 holds an infinite value"):
        load_choice_data(path, tmp_path / "out" / "o.h5", set_col="sid", choice_col="choice", x="x0,x1", batch_rows=8)
    assert os.listdir(tmp_path / "out") == []


# -- the sample data ------------------------------------------------------------------------------


def test_modechoice_loads(tmp_path):
    summary = load_choice_data(MODECHOICE, tmp_path / "m.h5", set_col="individual", choice_col="choice", x="gc,ttme,invc")
    assert (summary.n_sets, summary.n_rows, summary.K, summary.M) == (210, 840, 3, 3)
    assert summary.n_dropped_single_sets == 0


def test_modechoice_readme_command_adds_three_mode_constants(tmp_path):
    out = tmp_path / "modechoice.h5"
    run = subprocess.run([*ESTPIPE, "load", str(MODECHOICE), str(out), "--set-col", "individual", "--choice-col",
                          "choice", "--x", "gc,ttme", "--alt-col", "mode", "--asc"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "210 sets, 840 rows" in run.stdout
    frame = pd.read_csv(MODECHOICE)
    frame = frame.rename(columns={"individual": "sid", "mode": "alt"})
    want = expected(frame, ["gc", "ttme"], asc_levels=[2, 3, 4], cluster="none")
    names = ["gc", "ttme", "asc_2", "asc_3", "asc_4"]
    assert_loaded(out, want, names, names)
    with ChoiceDataFile(out) as f:
        assert (f.n_sets, f.n_rows) == (210, 840)
        assert f.provenance["options"]["alt_col"] == "mode" and f.provenance["input"] == str(MODECHOICE)
        assert f.provenance["estpipe_version"] and f.provenance["time"]


# -- bad input, through the real command line -----------------------------------------------------

GOOD = "sid,alt,choice,x0,x1,cl\n1,1,0,0.5,1.5,a\n1,2,1,0.7,1.1,a\n2,1,1,0.2,0.3,a\n2,2,0,0.4,0.9,b\n3,1,0,0.1,0.2,b\n3,2,1,0.3,0.8,b\n"
BASE = ["--set-col", "sid", "--choice-col", "choice", "--x", "x0,x1"]


def edit(line: int, column: str, value: str, text: str = GOOD) -> str:
    """GOOD with the value of `column` on (1-based) `line` replaced."""
    rows = [r.split(",") for r in text.splitlines()]
    rows[line - 1][rows[0].index(column)] = value
    return "\n".join(",".join(r) for r in rows) + "\n"


GOOD_CLUSTERED = edit(5, "cl", "b", edit(4, "cl", "b"))
# three sets of two decision makers (sets 1 and 2 are p1's), in two clusters
PANEL = ("sid,person,alt,choice,x0,x1,cl\n1,p1,1,0,0.5,1.5,a\n1,p1,2,1,0.7,1.1,a\n2,p1,1,1,0.2,0.3,a\n"
         "2,p1,2,0,0.4,0.9,a\n3,p2,1,0,0.1,0.2,b\n3,p2,2,1,0.3,0.8,b\n")

# id: (input file name, its content (None: not written), options, key words the message must hold)
BAD = {
    "missing-input": ("in.csv", None, BASE, ["in.csv", "no such file"]),
    "unsupported-extension": ("in.txt", GOOD, BASE, ["in.txt", "unsupported", ".parquet"]),
    "unknown-column": ("in.csv", GOOD, ["--set-col", "sid", "--choice-col", "choice", "--x", "x0,price"],
                       ["'price'", "--x", "sid, alt, choice, x0, x1, cl"]),
    "non-numeric": ("in.csv", edit(3, "x1", "abc"), BASE, ["line 3", "x1", "'abc'", "not a number"]),
    "missing-value": ("in.csv", edit(4, "x0", ""), BASE, ["line 4", "x0", "missing"]),
    "nan": ("in.csv", edit(6, "x0", "NaN"), BASE, ["line 6", "x0", "NaN"]),
    "infinite": ("in.csv", edit(7, "x1", "-inf"), BASE, ["line 7", "x1", "infinite"]),
    "missing-set-id": ("in.csv", edit(5, "sid", ""), BASE, ["line 5", "set id", "sid", "missing"]),
    "set-not-contiguous": ("in.csv", edit(6, "sid", "1", edit(7, "sid", "1")), BASE,
                           ["set 1", "line 2 to line 3", "again at line 6", "sort"]),
    "no-chosen-row": ("in.csv", edit(3, "choice", "0"), BASE, ["set 1", "no chosen row", "line 2 to line 3"]),
    "several-chosen-rows": ("in.csv", edit(6, "choice", "1"), BASE, ["set 3", "2 chosen rows"]),
    "choice-not-0-1": ("in.csv", edit(5, "choice", "2"), BASE, ["line 5", "choice", "is 2", "0 otherwise"]),
    "empty-file": ("in.csv", "", BASE, ["in.csv", "empty"]),
    "header-only": ("in.csv", GOOD.splitlines()[0] + "\n", BASE, ["in.csv", "no data rows"]),
    "fewer-moments-than-parameters": ("in.csv", GOOD, BASE + ["--z", "x0"], ["M = 1", "K = 2", "--z"]),
    "z-and-dm": ("in.csv", GOOD, BASE + ["--z", "x0,x1", "--dm", "x0,x1"], ["--z", "--dm", "not both"]),
    "cluster-not-contiguous": ("in.csv", edit(4, "cl", "b", edit(5, "cl", "b", edit(6, "cl", "a", edit(7, "cl", "a")))),
                               BASE + ["--cluster-col", "cl"], ["cluster a", "non-contiguous", "line 2", "line 6"]),
    "set-in-two-clusters": ("in.csv", GOOD, BASE + ["--cluster-col", "cl"], ["set 2", "different clusters", "line 5"]),
    "asc-base-not-a-level": ("in.csv", GOOD, BASE + ["--alt-col", "alt", "--asc", "--asc-base", "7"],
                             ["--asc-base 7", "alt", "levels are: 1, 2"]),
    "output-folder-missing": ("in.csv", GOOD, BASE, ["nofolder", "does not exist"]),
    "parquet-nan": ("in.parquet", edit(6, "x0", "NaN"), BASE, ["in.parquet", "row 4 (0-based)", "x0", "NaN"]),
    "too-large": ("in.csv", edit(5, "x1", "2e154"), BASE, ["line 5", "column x1", "2e+154", "beyond +-1e+154",
                                                          "rescale the column (e.g. to thousands)"]),
    "too-large-negative": ("in.csv", edit(3, "x0", "-1e200"), BASE, ["line 3", "column x0", "-1e+200", "rescale"]),
    "parquet-too-large": ("in.parquet", edit(4, "x1", "1e155"), BASE, ["row 2 (0-based)", "column x1", "1e+155"]),
    "duplicate-header-name": ("in.csv", GOOD.replace("x1,cl", "x0,cl", 1), BASE,
                              ["column 'x0' 2 times", "columns 4, 5", "unique"]),
    "alternative-twice-in-a-set": ("in.csv", edit(3, "alt", "1"), BASE + ["--alt-col", "alt"],
                                   ["set 1", "alternative 1 twice", "line 2 and line 3", "--alt-col"]),
    "panel-not-contiguous": ("in.csv", PANEL.replace("2,p1,", "2,p2,").replace("3,p2,", "3,p1,"), BASE + ["--panel-col", "person"],
                             ["panel unit p1", "not contiguous", "set 1 (line 2)", "set 3 (line 6)", "sort the file by person"]),
    "set-with-two-panel-units": ("in.csv", PANEL.replace("1,p1,2,", "1,p3,2,"), BASE + ["--panel-col", "person"],
                                 ["set 1", "different panel units", "p1, then p3 at line 3"]),
    "panel-unit-in-two-clusters": ("in.csv", PANEL.replace("2,p1,1,1,0.2,0.3,a", "2,p1,1,1,0.2,0.3,b")
                                   .replace("2,p1,2,0,0.4,0.9,a", "2,p1,2,0,0.4,0.9,b"),
                                   BASE + ["--panel-col", "person", "--cluster-col", "cl"],
                                   ["panel unit p1", "two clusters", "cl a", "from set 2 (line 4)", "cl b"]),
    "panel-col-is-the-set-col": ("in.csv", PANEL, BASE + ["--panel-col", "sid"], ["--panel-col sid", "--set-col"]),
    "decimal-comma": ("in.csv", edit(3, "x0", '"0,7"').replace(",", ";").replace('"0;7"', "0,7"), BASE,
                      ["line 3", "column x0", "'0,7'", "decimal comma"]),
}


def _run_bad(case: str, root: Path) -> subprocess.CompletedProcess:
    name, content, options, _ = BAD[case]
    folder = root / case
    (folder / "out").mkdir(parents=True)
    path = folder / name
    if content is not None:
        if name.endswith(".parquet"):
            import io

            import pyarrow as pa
            import pyarrow.parquet as pq

            frame = pd.read_csv(io.StringIO(content))
            # numpy arrays keep NaN as NaN (pandas would turn it into a null)
            pq.write_table(pa.table({c: pa.array(frame[c].to_numpy()) for c in frame}), path)
        else:
            path.write_text(content)
    out = folder / ("nofolder" if case == "output-folder-missing" else "out") / "o.h5"
    return subprocess.run([*ESTPIPE, "load", str(path), str(out), *options], capture_output=True, text=True)


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input case through the real CLI, run concurrently (each is a fresh process)."""
    root = tmp_path_factory.mktemp("bad")
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(BAD, pool.map(lambda c: _run_bad(c, root), BAD)))
    return root, runs


def test_good_input_of_the_bad_cases_loads(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(GOOD_CLUSTERED)
    run = subprocess.run([*ESTPIPE, "load", str(path), str(tmp_path / "o.h5"), *BASE, "--cluster-col", "cl",
                          "--alt-col", "alt", "--asc"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    with ChoiceDataFile(tmp_path / "o.h5") as f:
        assert (f.n_sets, f.n_rows, f.param_names) == (3, 6, ["x0", "x1", "asc_2"])
        np.testing.assert_array_equal(f.read_cluster(), [0, 1, 1])


IN_PROCESS = ["non-numeric", "missing-value", "nan", "infinite", "too-large", "missing-set-id", "set-not-contiguous", "no-chosen-row",
              "several-chosen-rows", "choice-not-0-1", "cluster-not-contiguous", "set-in-two-clusters"]


@pytest.mark.parametrize("batch_rows", [1, 2, 3], ids=lambda b: f"batch-{b}")
@pytest.mark.parametrize("case", IN_PROCESS)
def test_bad_input_found_whatever_the_batches(tmp_path, case, batch_rows):
    name, content, options, words = BAD[case]
    path = tmp_path / name
    path.write_text(content)
    opts = dict(zip(options[::2], options[1::2]))
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError) as caught:
        load_choice_data(path, tmp_path / "out" / "o.h5", set_col=opts["--set-col"], choice_col=opts["--choice-col"],
                         x=opts["--x"], cluster_col=opts.get("--cluster-col"), batch_rows=batch_rows)
    for word in words:
        assert word in str(caught.value)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_file(bad_runs, case):
    root, runs = bad_runs
    run = runs[case]
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("estpipe: error: "), run.stderr
    for word in BAD[case][3]:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert os.listdir(root / case / "out") == []
    assert run.stdout == ""


@pytest.mark.parametrize("value", ["1e154", "-1e154", "9.99e153"])
def test_values_up_to_1e154_load(tmp_path, value):
    path = tmp_path / "in.csv"
    path.write_text(edit(5, "x1", value))
    load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice", x="x0,x1")
    with ChoiceDataFile(tmp_path / "o.h5") as f:
        assert f.read_sets().X[3, 1] == float(value)


# -- other delimiters -----------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter, name", [pytest.param(";", "semicolon", id="semicolon"),
                                             pytest.param("\t", "tab", id="tab")])
def test_semicolon_or_tab_separated_file_loads_with_a_note(tmp_path, delimiter, name):
    """A header with no comma but semicolons (or tabs) is read with that delimiter, to the same
    arrays as the comma-separated file, and a note says so."""
    (tmp_path / "comma.csv").write_text(GOOD)
    (tmp_path / "other.csv").write_text(GOOD.replace(",", delimiter))
    runs = {}
    for stem in ("comma", "other"):
        runs[stem] = subprocess.run([*ESTPIPE, "load", str(tmp_path / f"{stem}.csv"), str(tmp_path / f"{stem}.h5"), *BASE,
                                     "--cluster-col", "sid"], capture_output=True, text=True)
        assert runs[stem].returncode == 0, runs[stem].stderr
    assert runs["comma"].stderr == ""
    assert runs["other"].stderr == (f"estpipe: note: {tmp_path / 'other.csv'}: the header is {name}-separated, "
                                    "not comma-separated; read it as such\n")
    with ChoiceDataFile(tmp_path / "comma.h5") as a, ChoiceDataFile(tmp_path / "other.h5") as b:
        np.testing.assert_array_equal(a.read_sets().X, b.read_sets().X)
        np.testing.assert_array_equal(a.read_sets().dm, b.read_sets().dm)
        assert b.provenance["input_delimiter"] == delimiter


# -- notes on x columns whose parameters are not identified ---------------------------------------


def _frame_with_unidentified_columns(rng, n_sets=40):
    frame = long_frame(rng, n_sets, n_x=1)
    sizes = frame.groupby("sid", sort=False).size().to_numpy()
    frame["income"] = np.repeat(rng.normal(size=n_sets).round(3), sizes)  # the same within each set
    frame["one"] = 1.0
    frame["x0_again"] = frame["x0"]
    return frame


@pytest.mark.parametrize("batch_rows", [1, 5, 1000], ids=lambda b: f"batch-{b}")
def test_unidentified_x_columns_get_notes_whatever_the_batches(tmp_path, batch_rows):
    frame = _frame_with_unidentified_columns(np.random.default_rng(7))
    path = write(frame, tmp_path / "in.csv")
    with vocabulary(cli_flag):  # the notes as the command line has them
        summary = load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice",
                                   x="x0,income,one,w,x0_again", alt_col="alt", asc=True, batch_rows=batch_rows)
    assert len(summary.notes) == 3, summary.notes
    income, one, twins = summary.notes  # in --x order, pairs last
    assert one.startswith("column one (--x) is 1 in every row") and "drop one from --x" in one
    assert income.startswith("column income (--x) never varies within a set") and "drop income from --x" in income
    assert twins.startswith("columns x0 and x0_again (--x) are equal in every row") and "drop one of them" in twins
    assert (tmp_path / "o.h5").exists()


def test_notes_on_stderr_and_the_file_is_written(tmp_path):
    frame = _frame_with_unidentified_columns(np.random.default_rng(8))
    path = write(frame, tmp_path / "in.csv")
    run = subprocess.run([*ESTPIPE, "load", str(path), str(tmp_path / "o.h5"), "--set-col", "sid", "--choice-col",
                          "choice", "--x", "x0,income,w"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("estpipe: note: column income (--x) never varies within a set"), run.stderr
    assert "wrote" in run.stdout and (tmp_path / "o.h5").exists()


def test_the_python_api_names_its_own_arguments(tmp_path):
    path = write(long_frame(np.random.default_rng(9), 30), tmp_path / "in.csv")
    with pytest.raises(UserError, match=r"^asc needs alt_col: name the column"):
        load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice", x="x0", asc=True)
    with pytest.raises(UserError, match=r"no column 'nope' \(asked by x\)"):
        load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice", x="x0,nope")


def test_x_columns_that_vary_get_no_notes(tmp_path):
    frame = long_frame(np.random.default_rng(9), 30)
    path = write(frame, tmp_path / "in.csv")
    summary = load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice", x="x0,x1,x2,w",
                               alt_col="alt", asc=True, batch_rows=3)
    assert summary.notes == []


# -- alternative ids and panel units ----------------------------------------------------------------


def _panel_frame(rng, n_units, max_sets=4):
    """long_frame's sets grouped into decision makers of 1..max_sets consecutive sets (ids shuffled
    text), with clusters of whole decision makers."""
    per_unit = rng.integers(1, max_sets + 1, n_units)
    frame = long_frame(rng, int(per_unit.sum()), min_size=1, max_size=5)
    set_ids = frame["sid"].to_numpy()
    first = np.r_[True, set_ids[1:] != set_ids[:-1]]
    set_index = np.cumsum(first) - 1
    unit_of_set = np.repeat(np.arange(n_units), per_unit)
    labels = np.array([f"u{v}" for v in rng.permutation(n_units * 2)[:n_units]])
    frame["person"] = labels[unit_of_set[set_index]]
    cluster_of_unit = np.arange(n_units) // 3
    frame["cl"] = cluster_of_unit[unit_of_set[set_index]]
    return frame, unit_of_set


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 7, 100_000])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_alternatives_and_panel_units_round_trip(tmp_path, batch_rows, suffix):
    """Each row's alternative comes back as its code into the sorted levels (names in the file),
    each set's decision maker as its unit numbered in order of appearance, whatever the batches,
    and sets with a single alternative are dropped with their rows' codes."""
    rng = np.random.default_rng(batch_rows)
    frame, unit_of_set = _panel_frame(rng, 25)
    path = write(frame, tmp_path / f"in{suffix}")
    summary = load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice", x="x0,x1", alt_col="alt",
                               panel_col="person", cluster_col="cl", batch_rows=batch_rows)
    sizes = frame.groupby("sid", sort=False).size().to_numpy()
    kept = sizes > 1
    levels = sorted(frame["alt"].unique())
    keep_rows = np.repeat(kept, sizes)
    with ChoiceDataFile(tmp_path / "o.h5") as f:
        data = f.read_sets()
        assert f.alt_names == [str(v) for v in levels] and f.has_panel
        np.testing.assert_array_equal(data.alt, np.searchsorted(levels, frame["alt"].to_numpy()[keep_rows]))
        assert data.alt.dtype == np.int32
        np.testing.assert_array_equal(data.panel, unit_of_set[kept])
        np.testing.assert_array_equal(f.read_panel(), unit_of_set[kept])
        assert f.param_names == ["x0", "x1"]  # alternative ids alone add no constants
        info = f.describe()
    assert summary.alt_names == [str(v) for v in levels]
    assert summary.n_units == info["panel"]["n_units"] == len(np.unique(unit_of_set[kept]))
    per_unit = np.bincount(unit_of_set[kept])
    per_unit = per_unit[per_unit > 0]
    assert info["panel"]["sets_per_unit"] == {"min": int(per_unit.min()), "mean": float(per_unit.mean()),
                                              "max": int(per_unit.max())}


def test_alt_col_with_asc_stores_the_alternatives_too(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(PANEL)
    load_choice_data(path, tmp_path / "o.h5", set_col="sid", choice_col="choice", x="x0,x1", alt_col="alt", asc=True)
    with ChoiceDataFile(tmp_path / "o.h5") as f:
        assert f.param_names == ["x0", "x1", "asc_2"] and f.alt_names == ["1", "2"] and not f.has_panel
        data = f.read_sets()
        np.testing.assert_array_equal(data.alt, [0, 1, 0, 1, 0, 1])
        np.testing.assert_array_equal(data.X[:, 2], data.alt)


def test_files_without_alternatives_or_panel_units_still_read(tmp_path):
    """A file as every writer before alternative ids and panel units made it (no alt, no panel,
    no truth_names) reads as before: no alternatives, no decision makers, the truth named by x."""
    from estpipe.data.format import ChoiceData, write_choice_data
    from estpipe.data.problem import read_problem

    data = ChoiceData(X=np.arange(8.0).reshape(4, 2), dm=np.ones((4, 2)), offsets=np.array([0, 2, 4]),
                      chosen=np.array([1, 0, 0, 1], dtype=np.int8))
    write_choice_data(tmp_path / "old.h5", data, ["a", "b"], ["m1", "m2"], truth=[0.5, -1.0])
    import h5py

    with h5py.File(tmp_path / "old.h5", "r") as raw:
        assert set(raw) == {"X", "dm", "offsets", "chosen", "truth"}
        assert not {"alt_names", "truth_names", "nests"} & set(raw.attrs)
    with ChoiceDataFile(tmp_path / "old.h5") as f:
        assert f.alt_names is None and not f.has_panel and f.read_panel() is None and f.nests is None
        assert f.truth_names == ["a", "b"]
        back = f.read_sets()
        assert back.alt is None and back.panel is None
        info = f.describe()
    assert info["alt_names"] is None and info["panel"] is None and info["truth_names"] == ["a", "b"]
    problem = read_problem(tmp_path / "old.h5")
    assert problem.alt_names is None and problem.panel is None
    np.testing.assert_array_equal(problem.truth_for(["a", "b"]), [0.5, -1.0])
    assert problem.truth_for(["a", "b_b", "sd_b"]) is None


PANEL_CASES = ["alternative-twice-in-a-set", "panel-not-contiguous", "set-with-two-panel-units", "panel-unit-in-two-clusters"]


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 5], ids=lambda b: f"batch-{b}")
@pytest.mark.parametrize("case", PANEL_CASES)
def test_bad_alternatives_and_panel_units_found_whatever_the_batches(tmp_path, case, batch_rows):
    _, content, options, words = BAD[case]
    path = tmp_path / "in.csv"
    path.write_text(content)
    opts = dict(zip(options[::2], options[1::2]))
    (tmp_path / "out").mkdir()
    with vocabulary(cli_flag), pytest.raises(UserError) as caught:
        load_choice_data(path, tmp_path / "out" / "o.h5", set_col="sid", choice_col="choice", x="x0,x1",
                         alt_col=opts.get("--alt-col"), panel_col=opts.get("--panel-col"),
                         cluster_col=opts.get("--cluster-col"), batch_rows=batch_rows)
    for word in words:
        assert word in str(caught.value)
    assert os.listdir(tmp_path / "out") == []


def test_the_good_panel_file_loads_with_its_decision_makers_and_alternatives(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text(PANEL)
    run = subprocess.run([*ESTPIPE, "load", str(path), str(tmp_path / "o.h5"), *BASE, "--panel-col", "person",
                          "--cluster-col", "cl", "--alt-col", "alt"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert "2 decision makers" in run.stdout and "2 alternatives (1, 2)" in run.stdout
    with ChoiceDataFile(tmp_path / "o.h5") as f:
        np.testing.assert_array_equal(f.read_panel(), [0, 0, 1])
        assert f.provenance["options"]["panel_col"] == "person"
