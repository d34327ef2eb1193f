"""`estpipe inspect`: the table and the JSON describe what the file holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from estpipe.cli.app import main
from estpipe.data.format import ChoiceDataFile
from estpipe.data.simulate import simulate_choice_data


def _inspect(capsys, *args) -> tuple[int, str, str]:
    try:
        main(["inspect", *map(str, args)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "sim.h5"
    simulate_choice_data(path, sets=120, alternatives=(2, 4), params=3, moments=5, seed=4, cluster_size=25)
    return path


def test_json_is_the_files_description(simulated, capsys):
    code, out, err = _inspect(capsys, simulated, "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    with ChoiceDataFile(simulated) as f:
        assert info == json.loads(json.dumps(f.describe()))
        sizes = np.diff(f.offsets)
        truth = f.truth
    assert info["n_sets"] == 120 and info["n_rows"] == int(sizes.sum())
    assert info["n_params"] == 3 and info["n_moments"] == 5
    assert info["param_names"] == ["x1", "x2", "x3"] and info["moment_names"][3:] == ["x1^2-1", "x2^2-1"]
    assert info["set_sizes"]["min"] == 2 and info["set_sizes"]["max"] == 4
    assert sum(info["set_sizes"]["counts"].values()) == 120
    assert info["n_clusters"] == 5 and info["has_chosen"] is True
    assert info["truth"] == truth.tolist()
    assert info["provenance"]["command"] == "estpipe simulate" and info["provenance"]["options"]["cluster_size"] == 25


def test_table_shows_sizes_names_truth_and_provenance(simulated, capsys):
    code, out, err = _inspect(capsys, simulated)
    assert code == 0 and err == ""
    with ChoiceDataFile(simulated) as f:
        info = f.describe()
    assert f"sets            {info['n_sets']}" in out
    assert f"rows            {info['n_rows']}" in out
    assert info["fingerprint"] in out
    assert "clusters        5" in out
    for size, count in info["set_sizes"]["counts"].items():
        assert f"{size:>4}  {count}" in out
    for name, value in zip(info["param_names"], info["truth"]):
        assert f"{name}  {value: .6f}" in out
    assert ", ".join(info["moment_names"]) in out
    assert "command: estpipe simulate" in out and "seed: 4" in out


def test_table_without_truth(tmp_path, capsys):
    path = tmp_path / "seed.h5"
    simulate_choice_data(path, design="seed", sets=10, alternatives=(3, 3), params=2, moments=2)
    code, out, _ = _inspect(capsys, path)
    assert code == 0
    assert "param  truth" not in out and "\nparams\nx1\nx2\n" in out
    assert "estimable: False" in out and "chosen          no" in out and "clusters        none" in out


def test_missing_file_exits_2(tmp_path, capsys):
    code, out, err = _inspect(capsys, tmp_path / "none.h5", "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no such file" in err


def test_table_shows_alternatives_decision_makers_and_the_truth_by_name(tmp_path, capsys):
    path = tmp_path / "mixed.h5"
    simulate_choice_data(path, design="mixed-logit", sets=50, alternatives=(3, 3), params=3, moments=6, seed=1,
                         random="x2", panel_size=5)
    code, out, _ = _inspect(capsys, path)
    assert code == 0
    assert "alternatives    3: a1, a2, a3" in out
    assert "panel units     10 decision makers, sets per unit min 5, mean 5.00, max 5" in out
    assert "nests" not in out.split("size  sets")[0]
    with ChoiceDataFile(path) as f:
        names, truth = f.truth_names, f.truth
    assert names == ["x1", "b_x2", "x3", "sd_x2"]
    for name, value in zip(names, truth):
        assert f"\n{name:<5}  {value: .6f}" in out
    code, out, _ = _inspect(capsys, path, "--json")
    info = json.loads(out)
    assert info["alt_names"] == ["a1", "a2", "a3"] and info["n_alternatives"] == 3
    assert info["panel"] == {"n_units": 10, "sets_per_unit": {"min": 5, "mean": 5.0, "max": 5}}
    assert info["truth_names"] == names and info["nests"] is None


def test_table_shows_the_nests_of_a_nested_logit_file(tmp_path, capsys):
    path = tmp_path / "nested.h5"
    simulate_choice_data(path, design="nested-logit", sets=30, alternatives=(10, 10), params=2, moments=8, seed=1, nests=3)
    code, out, _ = _inspect(capsys, path)
    assert code == 0
    assert "nests           n1=a1,a2,a3; n2=a4,a5,a6; n3=a7,a8,a9,a10" in out
    assert "alternatives    10: a1, a2, a3, a4, a5, a6, a7, a8, a9, a10" in out
    assert "panel units     none" in out
    assert "log_lambda_n3" in out


def test_a_loaded_file_without_alternatives_says_how_to_store_them(tmp_path, capsys):
    path = tmp_path / "seed.h5"
    from estpipe.data.format import ChoiceData, write_choice_data

    write_choice_data(path, ChoiceData(X=np.ones((4, 1)), dm=np.ones((4, 1)), offsets=np.array([0, 2, 4])), ["x"], ["x"])
    code, out, _ = _inspect(capsys, path)
    assert code == 0
    assert "alternatives    not stored (load with --alt-col)" in out and "load with --panel-col" in out
