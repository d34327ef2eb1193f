"""The command line as a whole: help for every command, exit codes, and simulate -> inspect
through real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from estpipe.cli.app import main

COMMANDS = ("simulate", "load", "inspect", "estimate", "bench", "run", "submit")


def _estpipe(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "estpipe", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def test_help_lists_every_command():
    proc = _estpipe("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert f" {name} " in proc.stdout, name


@pytest.mark.parametrize("name", COMMANDS)
def test_each_commands_help_exits_0(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"estpipe {name}" in out and "Example:" in out


@pytest.mark.parametrize(
    "name, options",
    [
        pytest.param("simulate", ["--design", "--sets", "--alternatives", "--params", "--moments", "--seed", "--cluster-size"], id="simulate"),
        pytest.param("inspect", ["--json"], id="inspect"),
    ],
)
def test_help_shows_the_designed_options(name, options, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main([name, "--help"])
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def _click_command(name: str):
    import typer.main

    from estpipe.cli.app import app

    return typer.main.get_command(app).commands[name]


def test_every_estimate_option_is_an_option_of_the_estimate_command():
    """EstimateOptions is the one definition; the command has an option for each field, spelled
    as errors.cli_flag spells it in messages and estimate_argv in batch scripts."""
    from dataclasses import fields

    from estpipe.errors import cli_flag
    from estpipe.orchestration import EstimateOptions

    params = {p.name: p for p in _click_command("estimate").params}
    for field in fields(EstimateOptions):
        assert field.name in params, field.name
        assert cli_flag(field.name) in params[field.name].opts, (field.name, params[field.name].opts)


def test_estimate_argv_is_read_back_by_the_estimate_command():
    """What a job spec fixes reaches `estpipe estimate` unchanged through the batch script's arguments."""
    from estpipe.cli.estimate import estimate_argv
    from estpipe.jobs.spec import ESTIMATE_KEYS
    from estpipe.orchestration import EstimateOptions

    options = EstimateOptions(model="logit-signed", optimizer="l-bfgs-b", derivatives="adjoint", steps=1,
                              start=[0.1, -2.0, 1e-300], tol=1.5e-7, no_cluster=True, max_iter=7, partitions=3)
    command = _click_command("estimate")
    ctx = command.make_context("estimate", ["data.h5", *estimate_argv(options, ESTIMATE_KEYS)])
    read = EstimateOptions(**{k: v for k, v in ctx.params.items() if k != "data"})
    for name in ESTIMATE_KEYS:
        assert getattr(read, name) == getattr(options, name), name
    assert estimate_argv(EstimateOptions(), ["no_cluster", "partitions"]) == []


@pytest.mark.parametrize("name", ["simulate", "load"])
def test_data_argv_is_read_back_by_its_command(name, tmp_path):
    """A job spec's [data] reaches `estpipe simulate` / `estpipe load` in a batch script unchanged:
    every field of the spec's data is an option of the command, and its argv reads back."""
    from estpipe.cli.load import load_argv
    from estpipe.cli.simulate import parse_alternatives, simulate_argv
    from estpipe.jobs.spec import LoadSpec, SimulateSpec

    if name == "simulate":
        data = SimulateSpec(path=tmp_path / "d.h5", design="seed", sets=7, alternatives=(2, 9), params=3, moments=5,
                            seed=4, cluster_size=2)
        argv = simulate_argv(data.path, **data.arguments())
    else:
        data = LoadSpec(path=tmp_path / "d.h5", input=tmp_path / "in.csv", set_col="s", choice_col="c", x=("a", "b"),
                        z=("a", "b", "q"), alt_col="mode", asc=True, asc_base="car", cluster_col="person")
        argv = load_argv(data.input, data.path, **data.arguments())
    params = _click_command(name).make_context(name, list(argv)).params
    assert params["out"] == data.path
    for key, value in data.arguments().items():
        read = params[key]
        if key == "alternatives":
            read = parse_alternatives(read)
        elif isinstance(value, tuple) and isinstance(read, str):
            read = tuple(read.split(","))
        assert read == value, key


def _registry(where: str):
    import importlib

    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("name", "registry"), [
    pytest.param("estimate", "estpipe.models:MODELS", id="estimate-model"),
    pytest.param("estimate", "estpipe.estimation.optimizers:OPTIMIZERS", id="estimate-optimizer"),
    pytest.param("estimate", "estpipe.kernel.derivatives:DERIVATIVES", id="estimate-derivatives"),
    pytest.param("estimate", "estpipe.execution.jobqueue:KINDS", id="estimate-jobqueue"),
    pytest.param("simulate", "estpipe.data.simulate:DESIGNS", id="simulate-design"),
    pytest.param("bench", "estpipe.kernel.derivatives:DERIVATIVES", id="bench-derivatives"),
    pytest.param("run", "estpipe.execution.jobqueue:KINDS", id="run-backends"),
])
def test_help_lists_the_choices_of_the_registries(name, registry, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main([name, "--help"])
    # the page's text without rich's boxes and line breaks
    text = " ".join(capsys.readouterr().out.replace("\u2502", " ").split())
    assert "{" + registry + "}" not in text
    assert _registry(registry).help() in text


def test_top_level_help_imports_none_of_the_layers_behind_the_registries():
    code = ("import sys\nfrom estpipe.entry import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('numpy', 'scipy', 'h5py') or "
            "m.startswith(('estpipe.kernel', 'estpipe.estimation', 'estpipe.models', 'estpipe.execution'))), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert " simulate " in proc.stdout and "{" not in proc.stdout
    assert proc.stderr.strip() == ""


def test_an_estimate_refused_for_bad_input_imports_no_scipy(tmp_path):
    """scipy (0.7 s of imports here) is imported where it is used, so a run refused for a missing
    file or a bad option answers in the time of the interpreter and the CLI alone."""
    code = ("import sys\nfrom estpipe.entry import main\nsys.argv = ['estpipe', 'estimate', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, sorted({m.split('.')[0] + '.' + m.split('.')[1] for m in sys.modules "
            "if m.startswith('scipy.')}))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.h5")], capture_output=True, text=True)
    assert proc.stdout.strip() == "2 []", (proc.stdout, proc.stderr)
    assert "missing.h5" in proc.stderr


def test_unknown_command_exits_2():
    proc = _estpipe("frobnicate")
    assert proc.returncode == 2
    assert "frobnicate" in proc.stderr


def test_simulate_then_inspect_json(tmp_path):
    out = tmp_path / "d.h5"
    sim = _estpipe("simulate", out, "--sets", "300", "--alternatives", "2:5", "--params", "3", "--moments", "6", "--seed", "9", "--cluster-size", "30")
    assert sim.returncode == 0, sim.stderr
    assert sim.stdout == ""  # the summary is not a result: it goes to stderr
    assert "300 sets" in sim.stderr and "rows/s" in sim.stderr and "MB/s" in sim.stderr
    ins = _estpipe("inspect", out, "--json")
    assert ins.returncode == 0, ins.stderr
    info = json.loads(ins.stdout)
    assert info["n_sets"] == 300 and info["n_params"] == 3 and info["n_moments"] == 6 and info["n_clusters"] == 10
    assert 2 <= info["set_sizes"]["min"] <= info["set_sizes"]["max"] <= 5
    assert info["provenance"]["options"] == {
        "design": "logit", "sets": 300, "alternatives": [2, 5], "params": 3, "moments": 6, "seed": 9, "cluster_size": 30,
    }
    assert len(info["truth"]) == 3
    assert os.listdir(tmp_path) == ["d.h5"]


@pytest.mark.parametrize(
    "args, words",
    [
        pytest.param(["--alternatives", "5:2"], "--alternatives 5:2", id="empty-range"),
        pytest.param(["--alternatives", "1"], "at least 2 alternatives", id="one-alternative"),
        pytest.param(["--alternatives", "two"], "expected a set size like 30", id="not-a-number"),
        pytest.param(["--sets", "0"], "--sets 0", id="no-sets"),
        pytest.param(["--params", "5", "--moments", "3"], "M >= K", id="M-below-K"),
        pytest.param(["--design", "probit"], "logit, seed", id="unknown-design"),
    ],
)
def test_simulate_bad_values_exit_2_with_one_line_and_no_file(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as info:
        main(["simulate", str(tmp_path / "out.h5"), *args])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("estpipe: error: ") and words in err
    assert os.listdir(tmp_path) == []


def test_simulate_into_a_missing_folder_exits_2(tmp_path):
    proc = _estpipe("simulate", tmp_path / "no" / "d.h5", "--sets", "5")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


USAGE_ERRORS = [
    pytest.param(["estimate", "d.h5", "--workers", "0"], "estimate", "'--workers'", id="estimate-workers-0"),
    pytest.param(["estimate", "d.h5", "--partitions", "0"], "estimate", "'--partitions'", id="estimate-partitions-0"),
    pytest.param(["estimate", "d.h5", "--workers"], "estimate", "'--workers' requires an argument", id="estimate-option-without-value"),
    pytest.param(["estimate", "d.h5", "--max-iter", "many"], "estimate", "'--max-iter'", id="estimate-bad-type"),
    pytest.param(["estimate"], "estimate", "Missing argument", id="estimate-missing-data"),
    pytest.param(["simulate", "{folder}"], "simulate", "is a directory", id="simulate-into-a-folder"),
    pytest.param(["simulate", "d.h5", "--sets", "abc"], "simulate", "'--sets'", id="simulate-bad-type"),
    pytest.param(["load", "in.csv", "o.h5", "--x", "a"], "load", "Missing option '--set-col'", id="load-missing-option"),
    pytest.param(["load", "in.csv", "o.h5", "--set-col", "s", "--choice-col", "c", "--x", "a", "--frob"], "load",
                 "No such option: --frob", id="load-unknown-option"),
    pytest.param(["inspect", "d.h5", "--jsn"], "inspect", "No such option: --jsn", id="inspect-unknown-option"),
    pytest.param(["submit", "job.toml", "--dry"], "submit", "--dry-run", id="submit-unknown-option-suggests"),
    pytest.param(["run"], "run", "Missing argument", id="run-missing-spec"),
    pytest.param(["bench", "--sets", "-"], "bench", "'--sets'", id="bench-bad-type"),
]


@pytest.mark.parametrize("argv, command, words", USAGE_ERRORS)
def test_usage_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, command, words):
    """click's usage errors, which Typer draws as a box under the usage, are one line like every
    other user error, with where to look: `estpipe <command> --help`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as info:
        main([a.format(folder=tmp_path / "folder") for a in argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("estpipe: error: ") and words in err, err
    assert err.rstrip().endswith(f"see `estpipe {command} --help`"), err
    assert sorted(os.listdir(tmp_path)) == ["folder"] and os.listdir(tmp_path / "folder") == []


def test_usage_error_through_the_real_command():
    proc = _estpipe("estimate", "d.h5", "--workers", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("estpipe: error: Invalid value for '--workers'") and proc.stderr.count("\n") == 1, proc.stderr


def test_version(capsys):
    from estpipe import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"estpipe {__version__}\n"


def test_no_arguments_prints_the_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2  # click's no_args_is_help code, as before
    out, err = capsys.readouterr()
    assert "Usage: estpipe" in out and " estimate " in out and err == ""
