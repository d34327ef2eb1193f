"""The notebook API (estpipe/notebook.py): from_frame writes the file `estpipe load` writes from
the same data as CSV and refuses what it refuses, naming the argument and the frame's row;
estimate() returns Results whose summary() is the CLI's table, to_frame() the results file's
numbers, _repr_html_ every parameter; simulate() returns the truth; the README's example runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pd = pytest.importorskip("pandas")

import estpipe  # noqa: E402
from estpipe import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODECHOICE = REPO / "data" / "modechoice.csv"
MC_ARGS = dict(set_col="individual", choice_col="choice", x=["invc", "invt", "ttme"], alt_col="mode", asc=True)


def cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "estpipe", *map(str, args)], capture_output=True, text=True,
                          check=check)


def h5_contents(path):
    """Every dataset (as arrays) and attribute of a file, provenance left out."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items() if k != "provenance"}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...]
                out[name + "@attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in obj.attrs.items()}
        f.visititems(visit)
    return out


def assert_same_file(a, b):
    ca, cb = h5_contents(a), h5_contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        if isinstance(ca[key], np.ndarray):
            assert ca[key].dtype == cb[key].dtype, key
            np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)
        else:
            assert ca[key] == cb[key], key


def test_from_frame_writes_the_file_load_writes_from_the_csv(tmp_path):
    df = pd.read_csv(MODECHOICE)
    summary = estpipe.from_frame(df, tmp_path / "frame.h5", **MC_ARGS)
    assert summary.n_sets == 210 and summary.param_names == ["invc", "invt", "ttme", "asc_2", "asc_3", "asc_4"]
    cli("load", MODECHOICE, tmp_path / "csv.h5", "--set-col", "individual", "--choice-col", "choice",
        "--x", "invc,invt,ttme", "--alt-col", "mode", "--asc")
    assert_same_file(tmp_path / "frame.h5", tmp_path / "csv.h5")


def _panel_frame(seed=4, n=120, J=4):
    rng = np.random.default_rng(seed)
    rows = n * J
    df = pd.DataFrame({
        "person": np.repeat(np.arange(n) // 3, J) + 100,  # decision makers of 3 sets
        "region": np.repeat(np.arange(n) // 12, J),  # clusters of 4 decision makers
        "trip": np.repeat(np.arange(n), J),
        "alt": np.tile(["bus", "car", "rail", "walk"], n),
        "cost": np.round(rng.uniform(1, 20, rows), 2),
        "time": rng.standard_normal(rows) * 10.0,
    })
    df["chosen"] = 0
    df.loc[np.arange(n) * J + rng.integers(0, J, n), "chosen"] = 1
    return df


def test_from_frame_with_clusters_panel_and_text_alternatives_equals_load(tmp_path):
    df = _panel_frame()
    df.to_csv(tmp_path / "p.csv", index=False, float_format="%.17g")
    args = dict(set_col="trip", choice_col="chosen", x="cost,time", alt_col="alt", asc=True, asc_base="car",
                cluster_col="region", panel_col="person", z=["cost", "time"])
    s = estpipe.from_frame(df, tmp_path / "frame.h5", **args)
    assert s.n_clusters == 10 and s.n_units == 40
    cli("load", tmp_path / "p.csv", tmp_path / "csv.h5", "--set-col", "trip", "--choice-col", "chosen",
        "--x", "cost,time", "--alt-col", "alt", "--asc", "--asc-base", "car", "--cluster-col", "region",
        "--panel-col", "person", "--z", "cost,time")
    assert_same_file(tmp_path / "frame.h5", tmp_path / "csv.h5")


def _bad(kind):
    df = pd.read_csv(MODECHOICE)
    df.index = df.index + 1000  # labels are not positions
    if kind == "missing column":
        return df, {"x": ["cost"]}, "no column 'cost' (asked by x)"
    if kind == "text in x":
        df["invc"] = df["invc"].astype(object)
        df.loc[1005, "invc"] = "12,5"
        return df, {}, "DataFrame: row 5 (index 1005): column invc holds '12,5', which is not a number (a decimal comma?"
    if kind == "NaN":
        df["invt"] = df["invt"].astype(float)
        df.loc[1009, "invt"] = np.nan
        return df, {}, "DataFrame: row 9 (index 1009): the value (column invt) is missing"
    if kind == "two chosen":
        df.loc[1005, "choice"] = 1
        return df, {}, "DataFrame: set 2 (row 4 (index 1004) to row 7 (index 1007)) has 2 chosen rows"
    if kind == "not contiguous":
        df = pd.concat([df.iloc[:2], df.iloc[6:], df.iloc[2:6]])
        return df, {}, ("DataFrame: the rows of set 1 are not contiguous: it occupies row 0 (index 1000) to row 1 (index 1001) "
                        "and appears again at row 836 (index 1002); sort the frame by individual")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing column", "text in x", "NaN", "two chosen", "not contiguous"])
def test_from_frame_refuses_what_load_refuses_naming_argument_and_row(tmp_path, kind):
    df, extra, expected = _bad(kind)
    out = tmp_path / "bad.h5"
    with pytest.raises(UserError) as info:
        estpipe.from_frame(df, out, **(MC_ARGS | extra))
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message and "--" not in message and "line " not in message
    assert not out.exists() and not list(tmp_path.iterdir())
    # the CLI refuses the same data written as CSV
    df.to_csv(tmp_path / "bad.csv", index=False)
    r = cli("load", tmp_path / "bad.csv", tmp_path / "bad2.h5", "--set-col", "individual", "--choice-col", "choice",
            "--x", ",".join((MC_ARGS | extra)["x"]), "--alt-col", "mode", "--asc", check=False)
    assert r.returncode == 2 and not (tmp_path / "bad2.h5").exists()


def test_estimate_results_summary_frame_and_html(tmp_path):
    estpipe.from_frame(pd.read_csv(MODECHOICE), tmp_path / "mc.h5", **MC_ARGS)
    r = estpipe.estimate(tmp_path / "mc.h5", estimator="mle", out=str(tmp_path / "r.json"))
    saved = json.loads((tmp_path / "r.json").read_text())
    frame = r.to_frame()
    assert list(frame.index) == saved["param_names"]
    for column, key in (("estimate", "params"), ("std_error", "std_errors"), ("z", "z"), ("p", "p_values"),
                        ("ci_low", "ci95_lower"), ("ci_high", "ci95_upper"),
                        ("std_error_classical", "std_errors_classical"), ("std_error_robust", "std_errors_robust")):
        np.testing.assert_allclose(frame[column].to_numpy(), saved[key], rtol=1e-12, atol=0)
    printed = cli("estimate", tmp_path / "mc.h5", "--estimator", "mle").stdout
    # the same table but for the run's own wall time at the end of its last line
    strip = lambda t: re.sub(r"\d+\.\d+ s, ", "", t.strip())  # noqa: E731
    assert strip(r.summary()) == strip(printed)
    html = r._repr_html_()
    assert all(f"<th>{n}</th>" in html for n in saved["param_names"]) and html.count("<tr>") == 7
    assert repr(r) == (f"<estpipe Results: maximum likelihood, 6 parameters (invc, invt, ttme, asc_2, asc_3, asc_4); "
                       f"converged; {tmp_path / 'mc.h5'}; summary() or to_frame() for the estimates>")
    assert "truth" not in frame  # the data has none
    with pytest.raises(UserError, match=r"unknown option 'estimater' \(did you mean 'estimator'\?\)") as info:
        estpipe.estimate(tmp_path / "mc.h5", estimater="mle")
    assert "\n" not in str(info.value) and "max_iter" in str(info.value)  # one line listing the options


def test_simulate_returns_the_truth_and_estimate_shows_it(tmp_path):
    sim = estpipe.simulate(tmp_path / "s.h5", sets=3000, alternatives="3:6", params=3, moments=6, seed=2)
    assert sim.path == tmp_path / "s.h5" and list(sim.truth) == ["x1", "x2", "x3"]
    frame = estpipe.estimate(sim.path).to_frame()
    np.testing.assert_array_equal(frame["truth"].to_numpy(), list(sim.truth.values()))
    assert np.all(np.abs((frame["estimate"] - frame["truth"]) / frame["std_error"]) < 4)
    with pytest.raises(UserError, match="simulate: unknown option 'set'"):
        estpipe.simulate(tmp_path / "t.h5", set=10)
    for bad, expected in ((dict(sets=2.5), "simulate: sets must be a whole number, got 2.5"),
                          (dict(seed="s"), "simulate: seed must be a whole number, got 's'"),
                          (dict(alternatives="a:b"), "simulate: alternatives='a:b' is not a size")):
        with pytest.raises(UserError, match=re.escape(expected)):
            estpipe.simulate(tmp_path / "t.h5", **bad)
    assert not (tmp_path / "t.h5").exists()


@pytest.mark.parametrize("start, expected", [("a,b", "start: entry 1 ('a') is not a number"),
                                             ([1, "x"], "start: entry 2 ('x') is not a number"),
                                             (5, "start: 5 is not a list of numbers"),
                                             ([0.1], "start has 1 value, but model logit")])
def test_estimate_option_values_are_checked_as_for_the_cli(tmp_path, start, expected):
    path = tmp_path / "s.h5"
    estpipe.simulate(path, sets=200, alternatives=3, params=2, moments=3, seed=1)
    with pytest.raises(UserError, match=re.escape(expected)) as info:
        estpipe.estimate(path, start=start)
    assert "\n" not in str(info.value)


def test_the_readme_example_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    section = text[text.index("### From a notebook"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "modechoice.csv").write_bytes(MODECHOICE.read_bytes())
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("estpipe estimate: ") and "maximum likelihood" in out and "asc_4" in out  # summary()
    assert "DataFrame: no column 'cost' (asked by x)" in out  # the error, as the comment says
    assert re.search(r"\{'x1': -?[\d.]+, 'x2': -?[\d.]+, 'x3': -?[\d.]+\}", out)  # the truth
    assert re.search(r"estimate\s+std_error\s+truth", out)  # the simulated data's frame has the truth
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mc.h5", "sim.h5"]  # no bad.h5


def test_from_frame_python_mistakes_are_one_line_user_errors(tmp_path):
    df = pd.read_csv(MODECHOICE)
    cases = [
        (dict(x=3), "x 3: give the column names as a list"),
        (dict(z={"invc": 1}), "z {'invc': 1}: give the column names as a list"),
    ]
    for extra, expected in cases:
        with pytest.raises(UserError, match=re.escape(expected)):
            estpipe.from_frame(df, tmp_path / "o.h5", **(MC_ARGS | extra))
    with pytest.raises(UserError, match=r"'individual' \(asked by set_col\) is the frame's index.*df\.reset_index\(\)"):
        estpipe.from_frame(df.set_index("individual"), tmp_path / "o.h5", **MC_ARGS)
    with pytest.raises(UserError, match="DataFrame: no rows"):
        estpipe.from_frame(df.iloc[:0], tmp_path / "o.h5", **MC_ARGS)
    assert not list(tmp_path.iterdir())


def test_unused_columns_of_any_type_do_not_matter_and_an_index_of_names_is_a_list(tmp_path):
    df = pd.read_csv(MODECHOICE)
    estpipe.from_frame(df, tmp_path / "plain.h5", **MC_ARGS)
    odd = df.assign(z=df["invc"] * 1j, nested=[{"a": [i]} for i in range(len(df))])  # Arrow cannot take complex
    estpipe.from_frame(odd, tmp_path / "odd.h5", **(MC_ARGS | {"x": df.columns[3:6]}))  # ttme, invc, invt
    with pytest.raises(UserError, match="cannot be converted to Arrow"):  # but a used one is refused
        estpipe.from_frame(odd, tmp_path / "bad.h5", **(MC_ARGS | {"x": ["invc", "z"]}))
    with h5py.File(tmp_path / "odd.h5") as f:
        assert [str(n) for n in f.attrs["param_names"]][:3] == ["ttme", "invc", "invt"]
    plain, other = h5_contents(tmp_path / "plain.h5"), h5_contents(tmp_path / "odd.h5")
    order = [2, 0, 1]  # x = ttme, invc, invt; plain has invc, invt, ttme
    np.testing.assert_array_equal(other["X"][:, :3], plain["X"][:, order])
    np.testing.assert_array_equal(other["chosen"], plain["chosen"])


def test_report_writes_the_html_report_or_says_the_module_is_missing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    sim = estpipe.simulate(tmp_path / "s.h5", sets=800, alternatives=4, params=2, moments=4, seed=5)
    r = estpipe.estimate(sim.path)
    path = r.report(tmp_path / "r.html")
    text = Path(path).read_text()
    assert Path(path) == tmp_path / "r.html" and text.startswith("<!") and all(n in text for n in r.param_names)
    monkeypatch.setitem(sys.modules, "estpipe.report", None)  # as before estpipe.report existed
    with pytest.raises(UserError, match="report module .* not available yet") as info:
        r.report(tmp_path / "r2.html")
    assert "\n" not in str(info.value) and not (tmp_path / "r2.html").exists()


def test_derived_quantities_are_marked_in_the_frame_and_the_html(tmp_path):
    sim = estpipe.simulate(tmp_path / "n.h5", design="nested-logit", sets=1500, alternatives=6, params=2, moments=6,
                           nests=2, seed=3)
    assert list(sim.truth) == ["x1", "x2", "log_lambda_n1", "log_lambda_n2"]
    r = estpipe.estimate(sim.path, model="nested-logit", nests=sim.summary.nests, estimator="mle",
                         out=str(tmp_path / "n.json"))
    saved = json.loads((tmp_path / "n.json").read_text())
    frame = r.to_frame()
    derived = frame[frame["kind"] == "derived"]
    assert list(derived.index) == [d["name"] for d in saved["derived"]] == ["lambda_n1", "lambda_n2"]
    for column, key in (("estimate", "estimate"), ("std_error", "std_error")):
        np.testing.assert_allclose(derived[column].to_numpy(), [d[key] for d in saved["derived"]], rtol=1e-12, atol=0)
    params = frame[frame["kind"] == "parameter"]
    np.testing.assert_array_equal(params["truth"].to_numpy(), saved["truth"])
    assert derived["truth"].isna().all()
    html = r._repr_html_()
    assert all(f"<th>{n}</th>" in html for n in list(params.index) + list(derived.index))
    assert html.count("<tr>") == 1 + 4 + 1 + 2  # head, parameters, the derived header, derived


def test_the_loaders_notes_are_warnings(tmp_path):
    df = pd.read_csv(MODECHOICE)
    with pytest.warns(UserWarning, match=r"^estpipe: note: column hinc \(x\) never varies within a set") as caught:
        s = estpipe.from_frame(df, tmp_path / "o.h5", **(MC_ARGS | {"x": ["invc", "hinc"]}))
    assert [str(w.message) for w in caught] == [f"estpipe: note: {n}" for n in s.notes] and len(s.notes) == 1
    assert (tmp_path / "o.h5").exists()


def test_without_pandas_one_line_naming_the_extra(tmp_path, monkeypatch):
    sim = estpipe.simulate(tmp_path / "s.h5", sets=200, alternatives=3, params=2, moments=3, seed=1)
    r = estpipe.estimate(sim.path)  # estimate and simulate need no pandas
    monkeypatch.setitem(sys.modules, "pandas", None)  # as in a core install
    for call in (lambda: estpipe.from_frame(None, tmp_path / "o.h5", set_col="s", choice_col="c", x=["x"]), r.to_frame):
        with pytest.raises(UserError, match=r'needs pandas.*pip install "estpipe\[notebook\]"') as info:
            call()
        assert "\n" not in str(info.value)
    assert "<table>" in r._repr_html_() and r.summary().startswith("estpipe estimate: ")  # these need no pandas


def test_not_converged_is_a_warning_and_the_results_come_back(tmp_path):
    sim = estpipe.simulate(tmp_path / "s.h5", sets=300, alternatives=4, params=2, moments=4, seed=3)
    with pytest.warns(UserWarning, match=r"^estpipe: NOT converged: ") as caught:
        r = estpipe.estimate(sim.path, max_iter=1)
    assert not r.converged and len(caught) == 1 and r.message.rstrip(".") in str(caught[0].message)
    assert r.summary().splitlines()[-1].startswith("NOT converged")
