"""MLE checkpoints and resume (DESIGN.md, "Checkpoint" and "Maximum likelihood"): a run killed
by a real signal mid-optimization leaves a checkpoint that `--resume` finishes from, to the same
estimate with fewer evaluations than a fresh run; a finished checkpoint is not optimized again;
a GMM checkpoint (or one of another optimizer) is refused for an MLE run in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import estimate_error_line
from estpipe.data.format import ChoiceDataFile
from estpipe.data.simulate import simulate_choice_data
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.orchestration.checkpoint import load_checkpoint

NESTS = "n1=a1,a2,a3,a4; n2=a5,a6,a7,a8"


def _options(**kw) -> EstimateOptions:
    return EstimateOptions(estimator="mle", model="nested-logit", nests=NESTS, **kw)


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """A nested-logit MLE of about 0.06 s per evaluation and some 14 BFGS iterations in-process:
    long enough to be killed in the middle of its optimizer."""
    path = tmp_path_factory.mktemp("mle-ckpt") / "nl.h5"
    simulate_choice_data(path, sets=60_000, alternatives=(8, 8), params=4, moments=6, seed=3, design="nested-logit",
                         nests=2)
    return path


def _optimizer_iterations(ckpt):
    def count() -> int:
        try:
            return sum(h["phase"] == "optimizer" for h in json.loads(ckpt.read_text())["history"])
        except (OSError, ValueError, KeyError):
            return 0
    return count


def test_a_run_killed_by_a_signal_resumes_to_the_same_estimate_with_fewer_evaluations(tmp_path, nested):
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this test runner")
    ckpt, out = tmp_path / "run.ckpt", tmp_path / "results.json"
    cmd = [sys.executable, "-m", "estpipe", "estimate", str(nested), "--estimator", "mle", "--model", "nested-logit",
           "--nests", NESTS, "--checkpoint", str(ckpt), "--resume", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    accepted, deadline = _optimizer_iterations(ckpt), time.monotonic() + 120
    while accepted() < 4:
        assert proc.poll() is None, f"the run ended before 4 accepted iterations: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no 4 accepted iterations within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert not out.exists()
    killed_at = json.loads(ckpt.read_text())
    assert killed_at["estimator"] == "mle" and killed_at["phase"] == "optimizer", "not killed mid-optimization"
    with ChoiceDataFile(nested) as f:
        fingerprint = f.fingerprint()
    state = load_checkpoint(ckpt, fingerprint, _options().result_options(), str(nested)).state
    assert state.iterations >= 4 and len(state.D) == 6 and state.evaluations == killed_at["history"][-1]["evaluations"]

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    d = json.loads(out.read_text())
    fresh = estimate(nested, _options())
    assert fresh.converged and d["converged"]
    np.testing.assert_allclose(d["params"], fresh.params, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(d["std_errors"], fresh.std_errors, rtol=1e-6)
    assert d["resumed"]["evaluations_before"] == killed_at["evaluations"]
    assert d["evaluations"] < fresh.evaluations, (d["evaluations"], fresh.evaluations)  # this run's count
    assert d["evaluations_total"] == killed_at["evaluations"] + d["evaluations"]
    assert f"{killed_at['iterations']} of them before resuming" in d["steps"][0]["message"]
    print(f"\nkilled after {killed_at['iterations']} iterations ({killed_at['evaluations']} evaluations); resumed run "
          f"{d['evaluations']} evaluations vs fresh {fresh.evaluations}; max |params - fresh| "
          f"{np.max(np.abs(np.array(d['params']) - fresh.params)):.2g}")
    finished = json.loads(ckpt.read_text())
    assert finished["phase"] == "finished" and finished["evaluations"] == d["evaluations_total"]
    # the history goes on from the killed run's: optimizer iterations numbered on, then the polish
    assert finished["history"][:len(killed_at["history"])] == killed_at["history"]
    assert [e["objective"] for e in d["steps"][0]["history"]] == [h["objective"] for h in finished["history"]]
    its = [h["iteration"] for h in finished["history"] if h["phase"] == "optimizer"]
    assert its == list(range(1, len(its) + 1)) and len(its) > len(killed_at["history"])


def test_a_gmm_checkpoint_or_another_optimizers_is_refused_for_an_mle_run(tmp_path):
    data, ckpt = tmp_path / "small.h5", tmp_path / "run.ckpt"
    simulate_choice_data(data, sets=300, alternatives=(4, 4), params=3, moments=6, seed=1)
    estimate(data, EstimateOptions(checkpoint=str(ckpt), steps=1))
    assert "estimator" not in json.loads(ckpt.read_text())["options"]  # GMM's, as before MLE had checkpoints
    line = estimate_error_line(data, ["--estimator", "mle", "--checkpoint", str(ckpt), "--resume", "--steps", "1"],
                               "logit")
    assert "other options (estimator was 'gmm', now 'mle', optimizer was 'gauss-newton', now 'bfgs'" in line, line
    ckpt.unlink()
    estimate(data, EstimateOptions(estimator="mle", checkpoint=str(ckpt)))
    assert json.loads(ckpt.read_text())["estimator"] == "mle"
    line = estimate_error_line(data, ["--estimator", "mle", "--optimizer", "bhhh", "--checkpoint", str(ckpt),
                                      "--resume"], "logit")
    assert "other options (optimizer was 'bfgs', now 'bhhh')" in line, line
    line = estimate_error_line(data, ["--checkpoint", str(ckpt), "--resume"], "logit")  # GMM on an MLE checkpoint
    assert "estimator was 'mle', now 'gmm'" in line, line
    d = json.loads(ckpt.read_text())
    del d["D"]
    ckpt.write_text(json.dumps(d))
    line = estimate_error_line(data, ["--estimator", "mle", "--checkpoint", str(ckpt), "--resume"], "logit")
    assert "a damaged estpipe checkpoint" in line and "remove it to start fresh" in line, line


def test_a_finished_checkpoint_gives_the_result_without_optimizing_again(tmp_path):
    data, ckpt = tmp_path / "small.h5", tmp_path / "run.ckpt"
    simulate_choice_data(data, sets=500, alternatives=(8, 8), params=3, moments=5, seed=2, design="nested-logit",
                         nests=2)
    options = _options(checkpoint=str(ckpt), resume=True)
    first = estimate(data, options)
    again = estimate(data, options)
    assert json.loads(ckpt.read_text())["phase"] == "finished"
    np.testing.assert_array_equal(again.params, first.params)
    # theta = D b again: rounding, through the forward-difference Hessian (error ~1e-8)
    np.testing.assert_allclose(again.std_errors, first.std_errors, rtol=1e-6)
    P = len(first.params)
    # one evaluation at the estimate and the Hessian's P (forward differences: the nested logit
    # has no exact one): no optimizer, no polish
    assert again.telemetry.evaluations == 1 + P < first.telemetry.evaluations
    assert again.steps[0].message == first.steps[0].message and again.converged


def test_steps_is_not_an_mle_option_of_the_checkpoint():
    """GMM's --steps means nothing to the MLE: a resume with another --steps is not refused."""
    from estpipe.orchestration import EstimateOptions

    a = EstimateOptions(estimator="mle", steps=2).result_options()
    assert a == EstimateOptions(estimator="mle", steps=1).result_options() and "steps" not in a
    assert EstimateOptions(steps=1).result_options() != EstimateOptions(steps=2).result_options()
