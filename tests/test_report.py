"""The HTML report (estpipe/report.py, `estpipe report`, `estimate --report`): every section of a
simulated two-step run, plots that decode as images with one estimate marker per parameter, the
truth when the data has it, results with optional keys removed, an MLE run's likelihood section,
the moment fit against its closed form, a 20-parameter two-step result, and the page in a real browser."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (matplotlib's own dependency)
from scipy import ndimage  # noqa: E402

from estpipe import report  # noqa: E402
from estpipe.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "estpipe", *map(str, args)], capture_output=True, text=True,
                          check=check)


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    cli("simulate", d / "d.h5", "--sets", 2000, "--alternatives", 10, "--params", 6, "--moments", 12, "--seed", 3)
    cli("estimate", d / "d.h5", "--out", d / "r.json", "--report", d / "r.html")
    return d, json.loads((d / "r.json").read_text())


def images(page: str) -> dict[str, Image.Image]:
    found = re.findall(r'<img class="([^"]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    return {cls: Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for cls, data in found}


def blobs(img: Image.Image, color: str, tol: int = 40) -> int:
    """Connected regions of pixels near `color` (#rrggbb)."""
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    a = np.asarray(img).astype(int)
    mask = np.abs(a - target).sum(axis=2) < tol
    return int(ndimage.label(mask)[1])


def test_a_two_step_report_has_every_section_and_its_plots(gmm_run):
    d, r = gmm_run
    page = (d / "r.html").read_text()
    for section in ('id="estimates"', 'id="convergence"', 'id="moments"', 'id="data-run"'):
        assert section in page, section
    assert 'id="likelihood"' not in page  # GMM
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert "converged:" in page and "NOT CONVERGED" not in page
    assert all(f"<td>{n}</td>" in page for n in r["param_names"])
    imgs = images(page)
    assert set(imgs) >= {"estimates-plot", "standardized-plot", "convergence", "moments", "sizes"}
    for name, img in imgs.items():
        a = np.asarray(img)
        assert a.std() > 5 and len(np.unique(a.reshape(-1, 3), axis=0)) > 10, name  # not a blank image
    P = len(r["params"])
    assert blobs(imgs["estimates-plot"], report.ESTIMATE_COLOR) == P
    assert blobs(imgs["estimates-plot"], report.TRUTH_COLOR) == P  # the truth, once per parameter
    assert blobs(imgs["standardized-plot"], report.ZERR_COLOR) == P
    # the estimates' colour is theirs alone: no other plot uses it
    assert all(blobs(img, report.ESTIMATE_COLOR) == 0 for name, img in imgs.items() if name != "estimates-plot")
    # convergence: one objective marker and one gradient-norm marker per accepted iteration
    iterations = sum(s["iterations"] for s in r["steps"])
    assert blobs(imgs["convergence"], report.OBJECTIVE_COLOR) == iterations
    assert blobs(imgs["convergence"], report.GRADIENT_COLOR) == iterations
    # every step's history is in the results, and in the page's tables
    assert [len(s["history"]) for s in r["steps"]] == [s["iterations"] for s in r["steps"]]
    for s in r["steps"]:
        h = s["history"]
        assert set(h[0]) >= {"iteration", "objective", "gradient_norm", "evaluations", "seconds"}
        assert [e["iteration"] for e in h] == list(range(1, len(h) + 1))
        assert h[-1]["evaluations"] <= s["evaluations"] and all(e["seconds"] >= 0 for e in h)
        assert h[-1]["gradient_norm"] < h[0]["gradient_norm"]
    assert page.count("<details>") >= len(r["steps"])
    # the J test and the set sizes (10 alternatives each)
    assert f"J = {r['j_statistic']:.4g}" in page and r["data"]["set_sizes"] == {"10": 2000}
    # the data and the run: sizes, clusters, the file's provenance, the back end, versions, options
    for text in ("<th>sets</th><td>2000</td>", "<th>clusters</th><td>none</td>", "<th>command</th><td>estpipe simulate</td>",
                 f"<th>back end</th><td>{r['backend']}</td>", f"<th>numpy</th><td>{r['versions']['numpy']}</td>",
                 "<th>optimizer</th><td>gauss-newton</td>", "seconds per evaluation"):
        assert text in page, text


def test_the_moment_fit_is_the_closed_form_for_the_efficient_weight(tmp_path):
    """Var(sqrt(n) g) = S - G (G'S^-1 G)^-1 G' at the two-step estimate, computed here from the
    kernel's sums at the estimate with W = S(b1)^-1 replaced by S(b2)^-1 (first order the same)."""
    from estpipe.data.format import read_choice_data
    from estpipe.kernel import PartitionKernel
    from estpipe.orchestration import EstimateOptions, estimate

    cli("simulate", tmp_path / "d.h5", "--sets", 4000, "--alternatives", 5, "--params", 3, "--moments", 7, "--seed", 5)
    res = estimate(tmp_path / "d.h5", EstimateOptions())
    fit = res.moments
    kernel = PartitionKernel(read_choice_data(tmp_path / "d.h5"), model="logit")
    s = kernel.sums(res.params, covariance=True)
    S, G, n = s.S, s.G, s.n_sets
    # the run's W = S(b1)^-1: P = I - G (G'WG)^-1 G'W, Var = P S P'
    W = np.linalg.inv(kernel.sums(np.array(res.steps[0].params), jacobian=False, covariance=True).S)
    P = np.eye(7) - G @ np.linalg.solve(G.T @ W @ G, G.T @ W)
    np.testing.assert_allclose(fit["std_errors"], np.sqrt(np.diag(P @ S @ P.T) / n), rtol=1e-6)
    np.testing.assert_allclose(fit["g"], s.g, rtol=1e-8, atol=1e-14)
    # and near the efficient form S - G (G'S^-1 G)^-1 G' (W at b1, not b2), of rank M - K
    V = S - G @ np.linalg.solve(G.T @ np.linalg.solve(S, G), G.T)
    np.testing.assert_allclose(fit["std_errors"], np.sqrt(np.diag(V) / n), rtol=0.05)
    assert np.linalg.matrix_rank(V, tol=1e-9 * np.abs(V).max()) == 7 - 3
    # just identified: no moment section
    exact = estimate(tmp_path / "d.h5", EstimateOptions(estimator="mle"))
    assert exact.moments is None
    # GMM with M = K: no moment fit (every g is 0 at the estimate), no section
    cli("simulate", tmp_path / "k.h5", "--sets", 1000, "--alternatives", 5, "--params", 3, "--moments", 3, "--seed", 5)
    just = estimate(tmp_path / "k.h5", EstimateOptions())
    assert just.moments is None and just.j_statistic is None
    assert 'id="moments"' not in report.render(just.to_dict())
    # the notebook API's Results.report writes the same page
    page = exact.report(tmp_path / "nb.html").read_text()
    assert 'id="likelihood"' in page and 'id="moments"' not in page and 'id="convergence"' in page


def test_older_or_partial_results_still_render(gmm_run, tmp_path):
    _, r = gmm_run
    old = copy.deepcopy(r)
    for key in ("truth", "moments", "derived", "notes", "versions", "timing", "data", "z", "p_values", "ci95_lower",
                "ci95_upper", "j_statistic"):
        old.pop(key, None)
    for s in old["steps"]:
        s.pop("history")
    page = report.render(old)
    assert 'id="estimates"' in page and 'id="convergence"' not in page and 'id="moments"' not in page
    assert "standardized-plot" not in page and "estimates-plot" in page
    minimal = {k: r[k] for k in ("params", "param_names", "std_errors")}
    assert "estimates-plot" in report.render(minimal)
    with pytest.raises(UserError, match="the results have no 'std_errors'"):
        report.render({"params": [1.0], "param_names": ["a"]})
    bad = dict(r, converged=False, message="stopped after 3 iterations")
    page = report.render(bad)
    assert "NOT CONVERGED: stopped after 3 iterations" in page
    assert page.index("NOT CONVERGED") < page.index('id="estimates"')  # at the top
    # a standard error that is NaN or null (a flat direction): the point without an interval
    flat = copy.deepcopy(r)
    flat["std_errors"][0], flat["std_errors"][1] = float("nan"), None
    imgs = images(report.render(flat))
    assert blobs(imgs["estimates-plot"], report.ESTIMATE_COLOR) == len(r["params"])
    assert blobs(imgs["standardized-plot"], report.ZERR_COLOR) == len(r["params"]) - 2


def test_an_mle_report_shows_the_likelihood(tmp_path):
    cli("load", REPO / "data" / "modechoice.csv", tmp_path / "mc.h5", "--set-col", "individual", "--choice-col",
        "choice", "--x", "invc,invt,ttme", "--alt-col", "mode", "--asc")
    cli("estimate", tmp_path / "mc.h5", "--estimator", "mle", "--out", tmp_path / "r.json")
    out = cli("report", tmp_path / "r.json")
    assert out.stdout.strip() == str(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    r = json.loads((tmp_path / "r.json").read_text())
    assert 'id="likelihood"' in page and f"{r['loglik']:.6g}" in page and f"{r['aic']:.6g}" in page
    assert "classical" in page and 'id="moments"' not in page
    imgs = images(page)
    assert blobs(imgs["estimates-plot"], report.ESTIMATE_COLOR) == 6
    assert blobs(imgs["estimates-plot"], report.TRUTH_COLOR) == 0 and "standardized-plot" not in imgs  # no truth
    # the MLE's history: the optimizer's iterations, then the BHHH polish, one line each in the plot
    step = r["steps"][0]
    h = step["history"]
    assert len(h) == step["iterations"] and [e["iteration"] for e in h] == list(range(1, len(h) + 1))
    phases = [e["phase"] for e in h]
    assert phases[0] == "optimizer" and phases == sorted(phases)  # optimizer..., polish...
    assert h[-1]["gradient_norm"] < 1e-6 < h[0]["gradient_norm"]
    assert h[-1]["objective"] == pytest.approx(-r["loglik"], rel=1e-9)
    assert h[-1]["evaluations"] <= r["evaluations"]
    assert 'id="convergence"' in page and "then BHHH polish" in page
    assert blobs(imgs["convergence"], report.GRADIENT_COLOR) == len(h)
    # without the likelihood keys and the history (an older file), it still renders
    old = {k: v for k, v in r.items() if k not in ("loglik_null", "rho_squared", "rho_squared_adj", "aic", "bic",
                                                   "n_units", "n_draws", "draws_kind", "std_errors_classical",
                                                   "std_errors_robust", "loglik")}
    for s in old["steps"]:
        s.pop("history")
    page = report.render(old)
    assert 'id="likelihood"' in page and 'id="convergence"' not in page and "AIC" in page
    assert f"{r['aic']:.6g}" not in page


def test_per_iteration_counts_restart_where_a_resumed_run_began():
    """The history's running counts fall where a resumed run began (GMM: the step's count starts
    again; MLE: the seconds): that iteration's own count is the count itself, never negative."""
    h = [{"evaluations": 2, "seconds": 0.5}, {"evaluations": 3, "seconds": 0.75},  # the first run
         {"evaluations": 1, "seconds": 0.25}, {"evaluations": 4, "seconds": 1.0}]  # resumed
    assert report._per_iteration(h) == [(2, 0.5), (1, 0.25), (1, 0.25), (3, 0.75)]
    assert report._per_iteration([{"iteration": 1}]) == [(None, None)]


def test_report_errors_are_one_line(tmp_path):
    r = cli("report", tmp_path / "missing.json", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    (tmp_path / "x.json").write_text("[1, 2]")
    r = cli("report", tmp_path / "x.json", check=False)
    assert r.returncode == 2 and "not a results file" in r.stderr


def test_without_matplotlib_one_line_and_exit_2(gmm_run, tmp_path):
    """The core install has no matplotlib: `report` and `estimate --report` say so in one line,
    the latter before any work (no results file written)."""
    d, _ = gmm_run
    hide = "import sys; sys.modules['matplotlib'] = None; from estpipe.entry import main; sys.argv[0] = 'estpipe'; main()"
    r = subprocess.run([sys.executable, "-c", hide, "report", str(d / "r.json"), "--out", str(tmp_path / "x.html")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and 'pip install "estpipe[report]"' in r.stderr
    assert not (tmp_path / "x.html").exists()
    r = subprocess.run([sys.executable, "-c", hide, "estimate", str(d / "d.h5"), "--out", str(tmp_path / "r.json"),
                        "--report", str(tmp_path / "r.html")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "matplotlib" in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_a_20_parameter_two_step_result_renders_with_both_steps(tmp_path):
    """The benchmark's result (scripts/bench_report.py times writing it: speed is a benchmark's
    business, not a test's): 20 parameters, two steps, both in the convergence section."""
    cli("simulate", tmp_path / "d.h5", "--sets", 1000, "--seed", 1)
    cli("estimate", tmp_path / "d.h5", "--out", tmp_path / "r.json")
    cli("report", tmp_path / "r.json", "--out", tmp_path / "r.html")
    assert len(json.loads((tmp_path / "r.json").read_text())["params"]) == 20
    page = (tmp_path / "r.html").read_text()
    assert "Convergence" in page and page.count("step 2") >= 1


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def locate(shot: Image.Image, img: Image.Image) -> tuple[int, int]:
    """Where `img` appears, pixel for pixel, in the screenshot `shot` (x, y of its top left): a
    row of the image with many distinct pixels is found in the screenshot's rows, then the whole
    region is compared."""
    a, s = np.asarray(img), np.asarray(shot)
    h, w = a.shape[:2]
    row = max(range(h), key=lambda y: len(np.unique(a[y], axis=0)))
    needle = a[row].tobytes()
    for y in range(s.shape[0] - h + row + 1):
        hay = s[y].tobytes()
        at = hay.find(needle)
        while at >= 0:
            if at % 3 == 0:
                x, top = at // 3, y - row
                if top >= 0 and np.abs(s[top:top + h, x:x + w].astype(int) - a.astype(int)).mean() < 2:
                    return x, top
            at = hay.find(needle, at + 1)
    raise AssertionError("the plot is not in the screenshot")


def test_the_report_in_a_real_browser(gmm_run):
    """Headless Chromium shows the report page itself: the estimates plot is on the screen where
    its PNG is, with one marker of the estimates' colour per parameter inside that region and
    none outside it."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing on CI (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    d, r = gmm_run
    page = (d / "r.html").read_text()
    plot = images(page)["estimates-plot"]
    shot = d / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", f"--screenshot={shot}", "--window-size=1100,4000",
                    (d / "r.html").as_uri()], capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    x, y = locate(img, plot)
    w, h = plot.size
    assert blobs(img.crop((x, y, x + w, y + h)), report.ESTIMATE_COLOR) == len(r["params"])
    outside = np.asarray(img).copy()
    outside[y:y + h, x:x + w] = 255
    assert blobs(Image.fromarray(outside), report.ESTIMATE_COLOR) == 0
    # the page above the plot: the green banner (converged) is drawn
    banner = np.asarray(img)[:y].reshape(-1, 3).astype(int)
    assert (np.abs(banner - [0xe5, 0xf5, 0xe0]).sum(axis=1) < 6).sum() > 1000


def test_log_axis_labels_are_plain_text_powers_of_ten():
    """The convergence plots' log axes label decades as 10 with Unicode superscripts (no mathtext,
    whose parser cost 0.2-0.4 s of every report), anything else by its value."""
    f = report._power_of_ten
    assert [f(v) for v in (1e-12, 1e-3, 0.1, 1.0, 10.0, 100.0)] == ["10⁻¹²", "10⁻³", "10⁻¹", "1", "10", "10²"]
    assert f(2e-5) == "2e-05" and f(0.5) == "0.5" and f(0.0) == "" and f(float("nan")) == ""
