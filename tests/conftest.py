"""Shared test set-up: floating-point errors raised, but not underflow (exp of a very negative
utility underflowing to 0 is correct)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _raise_on_float_errors():
    old = np.seterr(over="raise", invalid="raise", divide="raise", under="ignore")
    yield
    np.seterr(**old)


def write_huge_file(path, n_sets: int = 1000, J: int = 10_000_000):
    """A choice-data file far too big for memory (149 GiB of X and dm): HDF5 stores no unwritten
    chunks, so the file itself is small."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("offsets", data=np.arange(n_sets + 1, dtype=np.int64) * J)
        f.create_dataset("X", (n_sets * J, 2), dtype="f8", chunks=(65536, 2))
        f.create_dataset("dm", (n_sets * J, 2), dtype="f8", chunks=(65536, 2))
        for k, v in dict(estpipe_format="choice-data", estpipe_format_version=1, n_sets=n_sets, n_rows=n_sets * J,
                         n_params=2, n_moments=2, param_names=["a", "b"], moment_names=["a", "b"], provenance="{}").items():
            f.attrs[k] = v
    return path


def one_error_line(stderr: str) -> str:
    """The one `estpipe: error:` line of a user mistake's stderr (and no traceback), asserted."""
    errors = [line for line in stderr.splitlines() if line.startswith("estpipe: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def estimate_error_line(path, args, model: str) -> str:
    """`python -m estpipe estimate PATH --model MODEL ARGS` as a user runs it: asserts exit 2
    and returns its one error line."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "estpipe", "estimate", str(path), "--model", model, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    return one_error_line(done.stderr)


def assert_monte_carlo(est, se, truth, zmax: float = 4.5, ratio_range=(0.65, 1.45)):
    """Recovery and inference over Monte Carlo data sets: est, se (data sets, P), truth (P,).
    Every estimate within zmax SE of the truth; 95% intervals covering at a binomially consistent
    rate (two-sided p > 0.001, pooled over parameters); the spread of the estimates over the mean
    standard error per parameter inside ratio_range. Returns (coverage, sd/se per parameter)."""
    from scipy.stats import binomtest

    est, se = np.asarray(est), np.asarray(se)
    z = (est - truth) / se
    assert np.all(np.abs(z) < zmax), z
    covered = int(np.sum(np.abs(z) < 1.959964))
    assert binomtest(covered, z.size, 0.95).pvalue > 0.001, covered / z.size
    ratio = est.std(axis=0, ddof=1) / se.mean(axis=0)
    assert np.all((ratio > ratio_range[0]) & (ratio < ratio_range[1])), ratio
    return covered / z.size, ratio
