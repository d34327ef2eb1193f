"""`estpipe bench` runs at a tiny size and reports every row (a real subprocess)."""

from __future__ import annotations

import json

import pytest
import subprocess
import sys

ROWS = {"f", "value", "dual", "gemm", "dual-single", "dual-generic", "adjoint", "fd", "fd-numpy"}


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "estpipe", "bench", "--sets", "20", "--alternatives", "5",
                           "--params", "3", "--moments", "4", "--repeat", "3", *args],
                          capture_output=True, text=True, timeout=120)


def test_bench_json_reports_every_row():
    run = _bench("--json", "--tile-rows", "30")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == ROWS
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["f"]["ratio"] == 1.0
    assert result["n_tiles"] == 4 and result["buffer_bytes"] > 0
    assert result["blas"] and all(b["num_threads"] >= 1 for b in result["blas"])
    assert result["max_rel_error"]["dual"] < 1e-12 and result["max_rel_error"]["adjoint"] < 1e-12
    assert result["max_rel_error"]["fd"] < 1e-4


def test_bench_table_and_bad_option():
    run = _bench()
    assert run.returncode == 0, run.stderr
    for name in ROWS:
        assert any(line.split()[:1] == [name] for line in run.stdout.splitlines()), name
    bad = subprocess.run([sys.executable, "-m", "estpipe", "bench", "--params", "5", "--moments", "4"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--moments 4 is smaller than --params 5" in bad.stderr


def test_bench_model_times_a_user_file_on_the_generic_path():
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / "user_logit.py"
    run = _bench("--json", "--model", f"{example}:UserLogit")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == ROWS | {"dual-model"}
    assert result["model_strategy"] == "generic-dual"
    assert result["model_ratio"] == rows["dual-model"]["median_ms"] / rows["dual"]["median_ms"]
    assert result["max_rel_error"]["dual-model-vs-logit"] < 1e-12
    builtin = _bench("--json", "--model", "logit-signed")
    assert builtin.returncode == 0 and json.loads(builtin.stdout)["model_strategy"] == "generic-dual"
    bad = _bench("--model", "missing.py:Nope")
    assert bad.returncode == 2 and "no such file missing.py" in bad.stderr


@pytest.mark.parametrize(("model", "strategy"), [("mixed-logit", "fused-mixed-logit"), ("nested-logit", "fused-nested-logit")])
def test_bench_model_times_the_models_that_need_options(model, strategy):
    """bench --model gives the mixed logit random coefficients on x1..x3 and the nested logit up
    to 3 contiguous nests of a1..aJ (its data then carry alternative ids), on their fused kernels."""
    run = _bench("--json", "--model", model)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["model_strategy"] == strategy and result["model_ratio"] > 0
