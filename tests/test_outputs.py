"""Disks and output paths: a file that cannot fit is refused before it is written, a disk that
fills anyway gives one line and no temporary file (and no crash at exit), every output path is
checked before the work, results are printed when their file cannot be written at the end, and
results and checkpoints get the usual permissions.

Full and read-only disks are real: small tmpfs mounts (root only, as on CI; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from estpipe.orchestration import EstimateOptions, estimate
from estpipe.data.simulate import simulate_choice_data


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size="8m", ro=False) -> a fresh tmpfs folder, unmounted after the test."""
    mounted = []

    def mount(size: str = "8m", ro: bool = False) -> Path:
        where = tmp_path / f"tmpfs-{len(mounted)}"
        _mount(where, f"size={size}" + (",ro" if ro else ""))
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Take all the free space of `folder`'s file system (another file, written fast)."""
    filler = folder / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    size = 0
    try:
        for step in (2**20, 4096, 1):
            try:
                while True:
                    os.posix_fallocate(fd, size, step)
                    size += step
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def _estpipe(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "estpipe", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("estpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outputs-data") / "small.h5"
    simulate_choice_data(path, sets=2000, alternatives=(5, 5), params=3, moments=6, seed=2)
    return path


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    """An estimation of a second or two, so a disk can be filled while it runs."""
    path = tmp_path_factory.mktemp("outputs-long") / "long.h5"
    simulate_choice_data(path, sets=60_000, alternatives=(20, 20), params=4, moments=8, seed=3)
    return path


def _csv(path: Path, n_sets: int, J: int = 4) -> Path:
    rng = np.random.default_rng(1)
    sets = np.repeat(np.arange(n_sets), J)
    choice = np.zeros(n_sets * J, dtype=np.int8)
    choice[np.arange(n_sets) * J] = 1
    x = rng.standard_normal((n_sets * J, 2)).round(3)
    with path.open("w") as f:
        f.write("set,choice,x1,x2\n")
        np.savetxt(f, np.column_stack([sets, choice, x]), fmt=["%d", "%d", "%.3f", "%.3f"], delimiter=",")
    return path


# -- sizes refused up front -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--sets", "10000000000"], "the file needs about", id="sets-1e10-disk"),
        pytest.param(["--alternatives", "100000000"], "of memory for its buffers", id="alternatives-1e8-memory"),
        pytest.param(["--params", "1000000", "--moments", "1000000"], "holds at most 4,000 columns", id="params-moments-1e6"),
        pytest.param(["--sets", "12345678901234567890123"], "more rows than a choice-data file can count", id="sets-23-digits"),
        pytest.param(["--params", "100", "--moments", "6000"], "holds at most 4,000 columns", id="moments-6000"),
    ],
)
def test_simulate_sizes_that_cannot_fit_get_one_line_up_front(tmp_path, args, expected):
    t0 = time.monotonic()
    done = _estpipe("simulate", tmp_path / "data.h5", *args)
    assert done.returncode == 2, done.stderr
    assert expected in _one_error_line(done.stderr)
    assert time.monotonic() - t0 < 10 and _names(tmp_path) == []


def test_the_largest_column_count_is_written_and_read(tmp_path):
    from estpipe.data.format import MAX_COLUMNS, ChoiceDataFile

    path = tmp_path / "wide.h5"
    simulate_choice_data(path, design="seed", sets=4, alternatives=(2, 2), params=MAX_COLUMNS, moments=MAX_COLUMNS)
    with ChoiceDataFile(path) as f:
        assert (f.K, f.M) == (MAX_COLUMNS, MAX_COLUMNS) and f.read_sets().X.shape == (8, MAX_COLUMNS)


def test_simulate_refuses_a_file_larger_than_the_free_space(tmpfs):
    disk = tmpfs("8m")
    done = _estpipe("simulate", disk / "data.h5", "--sets", "100000")
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "the file needs about" in line and "has only" in line and "free" in line and "--sets" in line
    assert str(disk) in line and _names(disk) == []


def test_load_refuses_a_file_larger_than_the_free_space_before_writing(tmp_path, tmpfs):
    disk = tmpfs("1m")
    csv = _csv(tmp_path / "trips.csv", 20_000)
    done = _estpipe("load", csv, disk / "data.h5", "--set-col", "set", "--choice-col", "choice", "--x", "x1,x2")
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "the file needs about" in line and "has only" in line and _names(disk) == []


# -- a disk that fills anyway -----------------------------------------------------------------
_WRITER = """
import sys
from pathlib import Path
import numpy as np
from estpipe.data.format import ChoiceDataWriter
from estpipe.errors import UserError

disk, when = Path(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)


def fill():
    import os
    fd = os.open(disk / "other-process-file", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)


try:
    # chunks of 1,024 rows (48 KiB of X): HDF5 caches them, so some writes fail only at the flush
    with ChoiceDataWriter(disk / "data.h5", ["a", "b"], ["a", "b", "c", "d"], chunk_rows=1024) as w:
        for i in range(400):
            X, dm = rng.standard_normal((1000, 2)), rng.standard_normal((1000, 4))
            w.append(X, dm, np.full(200, 5))
            if i == 0 and when == "append":
                fill()
        if when == "close":
            fill()
except UserError as exc:
    print(f"estpipe: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("when", [pytest.param("append", id="while-appending"), pytest.param("close", id="at-the-final-flush")])
def test_a_disk_filled_by_another_file_gives_one_line_and_no_crash(tmpfs, when):
    """The other file takes every byte left; the writer's next write, or its last flush, fails.
    h5py used to crash (segfault) at exit after such a failed close, with the temporary file left."""
    disk = tmpfs("8m")
    done = subprocess.run([sys.executable, "-c", _WRITER, str(disk), when], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    line = _one_error_line(done.stderr)
    assert line == (f"estpipe: error: no space left on {disk} (tmpfs) while writing {disk / 'data.h5'}; "
                    "free some space there or write to another folder")
    assert _names(disk) == ["other-process-file"]


def test_simulate_cli_on_a_disk_that_fills_while_it_writes(tmpfs):
    """The free-space check passes; another file takes the rest as soon as writing starts."""
    disk = tmpfs("160m")
    proc = subprocess.Popen([sys.executable, "-m", "estpipe", "simulate", str(disk / "data.h5"), "--sets", "100000",
                             "--alternatives", "2:30", "--params", "4", "--moments", "8", "--cluster-size", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in disk.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.002)
    filler = _fill(disk)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "no space left on" in _one_error_line(err)
    assert _names(disk) == [filler.name]


# -- output paths checked before the work -------------------------------------------------------
@pytest.fixture
def read_only(tmpfs) -> Path:
    return tmpfs("1m", ro=True)


@pytest.fixture
def full(tmpfs) -> Path:
    disk = tmpfs("256k")
    _fill(disk)
    return disk


def _case(kind: str, small_data: Path, tmp_path: Path, target: Path) -> list:
    if kind == "estimate-out":
        return ["estimate", small_data, "--out", target / "results.json"]
    if kind == "estimate-checkpoint":
        return ["estimate", small_data, "--out", tmp_path / "results.json", "--checkpoint", target / "run.ckpt"]
    if kind == "simulate":
        return ["simulate", target / "data.h5", "--sets", "100"]
    if kind == "load":
        # the input's sets are split in two: had the output not been checked first, the
        # structure pass would report that instead
        bad = tmp_path / "bad.csv"
        bad.write_text("set,choice,x1\n1,1,0.5\n1,0,0.1\n2,1,0.2\n2,0,0.3\n1,0,0.4\n")
        return ["load", bad, target / "data.h5", "--set-col", "set", "--choice-col", "choice", "--x", "x1"]
    spec = tmp_path / "job.toml"
    data = tmp_path / "made.h5" if kind == "run-results" else target / "made.h5"
    results = target / "results.json" if kind == "run-results" else tmp_path / "results.json"
    spec.write_text(textwrap.dedent(f"""
        [data]
        path = "{data}"
        sets = 200
        alternatives = 4
        params = 2
        moments = 2
        [output]
        results = "{results}"
        checkpoint = "{tmp_path / 'checkpoint.json'}"
    """))
    return ["run", spec]


CASES = ["estimate-out", "estimate-checkpoint", "simulate", "load", "run-results", "run-data"]


@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in CASES])
@pytest.mark.parametrize("where", [pytest.param("read_only", id="read-only"), pytest.param("full", id="full-disk")])
def test_unwritable_outputs_are_refused_before_any_work(request, small_data, tmp_path, kind, where):
    target = request.getfixturevalue(where)
    work = tmp_path / "work"
    work.mkdir()
    done = _estpipe(*_case(kind, small_data, work, target))
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done.stderr)
    assert str(target) in line
    assert ("Read-only file system" in line) if where == "read_only" else ("no space left on" in line)
    assert done.stdout == ""
    assert not (work / "made.h5").exists() and not (work / "results.json").exists()
    assert not any(p.name.endswith((".tmp", ".probe")) for p in target.iterdir())


# -- results never lost after the work ----------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "code"),
    [pytest.param([], 2, id="converged-exit-2"), pytest.param(["--max-iter", "1"], 3, id="not-converged-exit-3")],
)
def test_results_that_cannot_be_written_are_printed_first(tmpfs, long_data, extra, code):
    """The disk fills during the estimation: the table still reaches stdout, then one line. The
    checkpoint on the same disk fails too: one warning, and the run goes on."""
    disk = tmpfs("1m")
    out, ckpt = disk / "results.json", disk / "run.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "estpipe", "estimate", str(long_data), "--out", str(out),
                             "--checkpoint", str(ckpt), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # printed after the output paths were checked
    assert "sets" in first, first + proc.stderr.read()
    filler = _fill(disk)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "estimate" in out_text and "x1" in out_text and "std.err" in out_text  # the table
    line = _one_error_line(err)
    assert err.rstrip().splitlines()[-1] == line
    assert line.startswith(f"estpipe: error: no space left on {disk} (tmpfs) while writing {out}")
    assert sum("warning: no space left on" in w for w in err.splitlines()) <= 1
    assert not out.exists() and not any(p.name.endswith(".tmp") for p in disk.iterdir())
    assert sorted(p.name for p in disk.iterdir() if p.name != filler.name) in ([], ["run.ckpt"])


@pytest.mark.parametrize("umask", [pytest.param(0o022, id="umask-022"), pytest.param(0o007, id="umask-007")])
def test_results_and_checkpoint_follow_the_umask(small_data, tmp_path, umask):
    out, ckpt, data = tmp_path / "results.json", tmp_path / "run.ckpt", tmp_path / "data.h5"
    old = os.umask(umask)
    try:
        simulate_choice_data(data, sets=50, alternatives=(3, 3), params=2, moments=2)
        estimate(small_data, EstimateOptions(out=str(out), checkpoint=str(ckpt), steps=1))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for path in (out, ckpt, data):
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path.name, oct(path.stat().st_mode))
    assert json.loads(out.read_text())["converged"]
