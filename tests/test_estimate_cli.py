"""`estpipe estimate` through its command line: output, exit codes, every bad input (one line,
exit 2, nothing written), non-convergence (exit 3, results written), checkpoint and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from estpipe.cli.app import main
from estpipe.data.format import ChoiceData, write_choice_data
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.data.simulate import simulate_choice_data
from conftest import write_huge_file


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        main(["estimate", *map(str, argv)])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "small.h5"
    simulate_choice_data(path, sets=1500, alternatives=(4, 4), params=3, moments=6, seed=2)
    return path


def _write(path, X, dm, sizes, x_names=None, m_names=None, chosen=None):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    write_choice_data(path, ChoiceData(X=X, dm=dm, offsets=offsets, chosen=chosen),
                      x_names or [f"x{k + 1}" for k in range(X.shape[1])],
                      m_names or [f"z{m + 1}" for m in range(dm.shape[1])], provenance={"command": "test"})


def test_table_and_results_file(small, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, stdout, stderr = run_cli([small, "--out", out], capsys)
    assert code == 0, stderr
    assert "std.err" in stdout and "truth" in stdout and "J =" in stdout
    assert "step 1 iter" in stderr and "Q =" in stderr  # progress goes to stderr
    d = json.loads(out.read_text())
    design_keys = ("params param_names std_errors se_type covariance n_clusters objective j_statistic j_df j_pvalue "
                   "loglik converged message steps evaluations evaluations_total wall_seconds workers partitions config data "
                   "versions").split()
    assert all(k in d for k in design_keys), [k for k in design_keys if k not in d]
    assert d["converged"] and d["se_type"] == "robust" and d["n_clusters"] is None and d["j_df"] == 3
    assert d["evaluations_total"] == d["evaluations"]  # a fresh run
    assert [s["weighting"] for s in d["steps"]] == ["identity", "inverse-covariance"]
    assert all(k in d["steps"][0] for k in "weighting params objective iterations evaluations converged message".split())
    assert set(d["data"]) >= {"path", "n_sets", "n_rows", "K", "M", "fingerprint"}
    assert d["versions"]["blas"]["threads_per_worker"] >= 1
    assert np.array(d["covariance"]).shape == (3, 3)
    assert d["loglik"] < 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_json_on_stdout(small, capsys):
    code, stdout, _ = run_cli([small, "--json", "--steps", "1"], capsys)
    assert code == 0
    d = json.loads(stdout)
    assert len(d["steps"]) == 1 and d["j_statistic"] is None and d["j_pvalue"] is None


@pytest.mark.parametrize(("optimizer", "derivatives"), [
    pytest.param("bfgs", "dual", id="bfgs-dual"),
    pytest.param("bfgs", "adjoint", id="bfgs-adjoint"),
    pytest.param("l-bfgs-b", "adjoint", id="lbfgsb-adjoint"),
    pytest.param("gauss-newton", "fd", id="gauss-newton-fd"),
])
def test_optimizers_and_derivatives_agree(small, optimizer, derivatives):
    ref = estimate(small, EstimateOptions())
    r = estimate(small, EstimateOptions(optimizer=optimizer, derivatives=derivatives, tol=1e-9))
    np.testing.assert_allclose(r.params, ref.params, rtol=1e-5, atol=1e-6)


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    text = tmp_path / "notes.txt"
    text.write_text("not data\n")
    files["foreign"] = text
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    files["foreign-hdf5"] = other
    sizes = np.full(200, 3)
    X = rng.standard_normal((600, 3))
    files["m-less-than-k"] = tmp_path / "m_lt_k.h5"
    _write(files["m-less-than-k"], X, X[:, :2] - X[:, :2].mean(0), sizes)
    # x2 is the same for every alternative of a set: it never varies within sets
    Xc = X.copy()
    Xc[:, 1] = np.repeat(rng.standard_normal(200), 3)
    dm = np.column_stack([X, X[:, 0] ** 2 - 1]) - np.repeat(np.column_stack([X, X[:, 0] ** 2 - 1])[::3], 3, axis=0)
    files["constant-within-sets"] = tmp_path / "const.h5"
    _write(files["constant-within-sets"], Xc, dm, sizes, x_names=["price", "income", "time"])
    dmz = dm.copy()
    dmz[:, 2] = 0.0
    files["zero-moment"] = tmp_path / "zero_moment.h5"
    _write(files["zero-moment"], X, dmz, sizes, m_names=["z_price", "z_income", "z_time", "z_sq"])
    huge = write_huge_file(tmp_path / "huge.h5")
    files["huge"] = huge
    # bad values in the file's arrays: a NaN in X, an inf in dm, |x| beyond 1e154 in X
    for name, dataset, (row, col), value in [("nan-in-X", "X", (437, 2), np.nan), ("inf-in-dm", "dm", (5, 3), -np.inf),
                                             ("too-large-in-X", "X", (599, 0), 2e154)]:
        files[name] = tmp_path / f"{name}.h5"
        Xv, dmv = X.copy(), dm.copy()
        (Xv if dataset == "X" else dmv)[row, col] = value
        _write(files[name], Xv, dmv, sizes, x_names=["price", "income", "time"], m_names=["z_price", "z_income", "z_time", "z_sq"])
    return files


BAD = [
    pytest.param("missing", [], "no such file", id="missing-file"),
    pytest.param("foreign", [], "not an HDF5 file", id="foreign-file"),
    pytest.param("foreign-hdf5", [], "not an estpipe choice-data file", id="foreign-hdf5"),
    pytest.param("m-less-than-k", [], "M = 2 moments for 3 parameters", id="m-less-than-k"),
    pytest.param("small", ["--start", "0,0"], "--start has 2 values", id="start-wrong-length"),
    pytest.param("small", ["--start", "0,x,1"], "not a number", id="start-not-a-number"),
    pytest.param("small", ["--model", "probit"], "allowed", id="unknown-model"),
    pytest.param("small", ["--optimizer", "newton"], "allowed: gauss-newton, bfgs, l-bfgs-b", id="unknown-optimizer"),
    pytest.param("small", ["--derivatives", "ad"], "allowed: dual, adjoint, fd", id="unknown-derivatives"),
    pytest.param("small", ["--derivatives", "adjoint"], "use --optimizer bfgs or l-bfgs-b", id="adjoint-with-gauss-newton"),
    pytest.param("small", ["--start", "1e308,1e308,1e308"], "not finite at the start", id="non-finite-start"),
    pytest.param("small", ["--start", "1e300,1e300,-1e300"], "flat at the start", id="saturated-start"),
    pytest.param("constant-within-sets", [], "income never varies within sets", id="singular-GWG"),
    pytest.param("zero-moment", [], "z_time is the same in every set", id="singular-S"),
    pytest.param("small", ["--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "2"], "tcp://127.0.0.1:9", id="unreachable-scheduler"),
    pytest.param("small", ["--scheduler-file", "/nonexistent/sched.json"], "no such scheduler file", id="missing-scheduler-file"),
    pytest.param("huge", [], "will not fit in memory", id="will-not-fit-in-process"),
    pytest.param("huge", ["--workers", "2"], "will not fit in memory", id="will-not-fit-local-cluster"),
    pytest.param("small", ["--resume"], "--resume needs --checkpoint", id="resume-without-checkpoint"),
    pytest.param("small", ["--steps", "3"], "--steps must be 1 or 2", id="bad-steps"),
    pytest.param("nan-in-X", [], "nan-in-X.h5: dataset X, column time, row 437 (0-based, in set 145) is NaN", id="nan-in-X"),
    pytest.param("inf-in-dm", [], "dataset dm, column z_sq, row 5 (0-based, in set 1) is -inf", id="inf-in-dm"),
    pytest.param("too-large-in-X", [], "dataset X, column price, row 599 (0-based, in set 199) is 2e+154, beyond +-1e+154",
                 id="too-large-in-X"),
    pytest.param("too-large-in-X", [], "rescale column price (e.g. to thousands)", id="too-large-says-rescale"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, small):
    files = _bad_files(tmp_path_factory.mktemp("bad"))
    files["small"] = small
    files["missing"] = small.parent / "missing.h5"
    return files


@pytest.mark.parametrize(("which", "args", "expected"), BAD)
def test_bad_input_one_line_exit_2_nothing_written(bad_files, tmp_path, capsys, which, args, expected):
    out, ckpt = tmp_path / "results.json", tmp_path / "run.ckpt"
    checkpoint = [] if "--resume" in args else ["--checkpoint", ckpt]
    code, stdout, stderr = run_cli([bad_files[which], "--out", out, *checkpoint, *args], capsys)
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.startswith("estpipe: error:")]
    assert len(lines) == 1 and expected in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists() and not ckpt.exists()
    assert list(tmp_path.iterdir()) == []


def test_max_iter_exits_3_with_results_written(small, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, stdout, stderr = run_cli([small, "--max-iter", "2", "--out", out], capsys)
    assert code == 3, stderr
    d = json.loads(out.read_text())
    assert d["converged"] is False and "--max-iter 2" in d["message"]
    assert d["steps"][0]["iterations"] == 2 and not d["steps"][0]["converged"]
    assert "NOT converged" in stdout


def test_checkpoint_of_other_data_or_options_is_refused(small, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    code, _, _ = run_cli([small, "--checkpoint", ckpt, "--steps", "1"], capsys)
    assert code == 0 and json.loads(ckpt.read_text())["kind"] == "estpipe-checkpoint"
    other = tmp_path / "other.h5"
    simulate_choice_data(other, sets=300, alternatives=(4, 4), params=3, moments=6, seed=9)
    code, _, stderr = run_cli([other, "--checkpoint", ckpt, "--resume", "--steps", "1"], capsys)
    assert code == 2 and "belongs to other data" in stderr
    code, _, stderr = run_cli([small, "--checkpoint", ckpt, "--resume", "--steps", "2"], capsys)
    assert code == 2 and "other options (steps was 1, now 2)" in stderr


def test_killed_run_resumes_to_the_same_estimate_with_fewer_evaluations(tmp_path):
    data = tmp_path / "resume.h5"
    simulate_choice_data(data, sets=20_000, alternatives=(20, 20), params=4, moments=8, seed=6)
    fresh = estimate(data, EstimateOptions())
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "results.json"
    cmd = [sys.executable, "-m", "estpipe", "estimate", str(data), "--checkpoint", str(ckpt), "--resume", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert ckpt.exists() and not out.exists()
    killed_at = json.loads(ckpt.read_text())
    assert killed_at["history"], "no accepted iteration was recorded"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    d = json.loads(out.read_text())
    np.testing.assert_allclose(d["params"], fresh.params, rtol=1e-6)
    np.testing.assert_allclose(d["std_errors"], fresh.std_errors, rtol=1e-5)
    assert d["resumed"]["evaluations_before"] >= 1
    assert d["evaluations"] < fresh.evaluations  # this run's count
    assert d["evaluations_total"] == killed_at["evaluations"] + d["evaluations"]


def test_bad_value_found_by_a_dask_worker_is_one_line(bad_files, tmp_path):
    """The check runs where partitions are read: on a worker, the UserError comes back as the
    same one line, without the worker's "Compute Failed" log or the scheduler's close warnings."""
    proc = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(bad_files["nan-in-X"]), "--workers", "2",
                           "--partitions", "3", "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("estpipe: dask: ")]
    assert lines == [lines[0]] and lines[0].startswith("estpipe: error: ") and "column time, row 437" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_values_up_to_1e154_pass_the_check():
    """|value| <= 1e154 passes, also when the sum of squares overflows (many large values); just
    above it is refused."""
    from estpipe.errors import UserError
    from estpipe.execution.tasks import check_values

    offsets = np.array([0, 2, 4])
    big = np.full((4, 2), 1e154)
    big[1, 1] = -1e154
    check_values("f.h5", "X", big, ["a", "b"], 0, offsets, 0)
    big[3, 1] = 1.0000001e154
    with pytest.raises(UserError, match=r"f.h5: dataset X, column b, row 13 \(0-based, in set 6\)"):
        check_values("f.h5", "X", big, ["a", "b"], 10, offsets, 5)


def test_counts_of_one_are_singular(small, tmp_path, capsys):
    """"1 evaluation", "1 iteration": --max-iter 1 stops every step after one iteration."""
    code, stdout, stderr = run_cli([small, "--max-iter", "1", "--out", tmp_path / "r.json"], capsys)
    assert code == 3, stderr
    assert "(1 evaluation)" in stderr and "(1 iteration, " in stderr
    assert "stopped after --max-iter 1 iteration without converging" in stdout
    assert not any(f"1 {word}s" in stdout + stderr for word in ("evaluation", "iteration", "partition", "set", "worker"))


@pytest.mark.parametrize("n, text", [(0, "0 sets"), (1, "1 set"), (2, "2 sets"), (12345, "12,345 sets")])
def test_count_text(n, text):
    from estpipe.text import count

    assert count(n, "set", thousands=True) == text
