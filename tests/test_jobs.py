"""Job specs: validation that reports every problem, path resolution, and the rendered batch scripts
(no batch system needed; the real Slurm runs are in test_slurm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from estpipe.errors import UserError
from estpipe.jobs import load_job_spec, render, render_pbs, render_slurm
from estpipe.jobs.run import estimate_options
from estpipe.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
EXPECTED = Path(__file__).resolve().parent / "expected"


def write_spec(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(UserError) as info:
        load_job_spec(path)
    return str(info.value).splitlines()


@pytest.mark.parametrize("name", ["seed", "large", "slurm", "pbs"])
def test_shipped_specs_are_valid(name):
    spec = load_job_spec(JOBS / f"{name}.toml")
    assert spec.name == name
    assert spec.data.path.is_absolute() and spec.output.results.is_absolute()


def test_shipped_seed_spec_has_the_reports_sizes():
    spec = load_job_spec(JOBS / "seed.toml")
    data = spec.data
    assert (data.design, data.sets, data.alternatives, data.params, data.moments) == ("logit", 1000, (30, 30), 20, 40)
    assert spec.backend.kind == "local"
    assert load_job_spec(JOBS / "large.toml").data.sets == 100_000
    slurm = load_job_spec(JOBS / "slurm.toml").backend
    assert (slurm.kind, slurm.workers) == ("slurm", 2)


def test_relative_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write_spec(tmp_path / "sub", '[data]\npath = "../d/data.h5"\n[output]\nresults = "r.json"\n')
    spec = load_job_spec(path)
    assert spec.data.path == (tmp_path / "d" / "data.h5").resolve()
    assert spec.output.results == (tmp_path / "sub" / "r.json").resolve()
    # The checkpoint and logs default next to the results and the spec.
    assert spec.output.checkpoint == (tmp_path / "sub" / "r.checkpoint.json").resolve()
    assert spec.output.logs == (tmp_path / "sub" / "logs").resolve()


def test_a_spec_with_several_mistakes_lists_them_all(tmp_path):
    path = write_spec(tmp_path, """
nmae = "x"
[data]
path = "d.h5"
sets = -5
desing = "logit"
alternatives = "30:2"
[estimate]
optimizer = "newton"
max_iters = 5
steps = 3
[backend]
kind = "slurm"
walltime = "2h"
memory = "lots"
queue = "debug"
[outputs]
results = "r.json"
""")
    lines = problems_of(path)
    assert lines[0] == f"job spec {path} has 11 problems:"
    body = "\n".join(lines[1:])
    for expected in [
        "nmae: unknown key (did you mean 'name'?)",
        "outputs: unknown table (did you mean 'output'?)",
        "data.sets: -5 is not allowed; a whole number >= 1",
        "data.desing: unknown key for simulated data (no `input` is given) (did you mean 'design'?)",
        "data.alternatives: '30:2' is not allowed",
        # [estimate] is checked by the code that checks `estpipe estimate`, with its messages
        "estimate.optimizer: unknown optimizer 'newton'; allowed: gauss-newton, bfgs, l-bfgs-b (did you mean 'gauss-newton'?)",
        "estimate.max_iters: unknown key (did you mean 'max_iter'?)",
        "estimate.steps must be 1 or 2, got 3",
        "backend.queue: unknown key for kind 'slurm' (Slurm calls it partition)",
        "backend.walltime: '2h' is not allowed",
        "backend.memory: 'lots' is not allowed",
    ]:
        assert expected in body, expected
    assert len(lines) == 12


@pytest.mark.parametrize("model", MODELS.names)
def test_every_model_the_command_line_accepts_a_spec_accepts(tmp_path, model):
    """A spec used to refuse model = "logit-signed", which `estpipe estimate --model` took."""
    spec = load_job_spec(write_spec(tmp_path, f'[data]\npath = "d.h5"\n[estimate]\nmodel = "{model}"\noptimizer = "bfgs"\n'
                                              '[backend]\nkind = "slurm"\n'))
    assert estimate_options(spec).model == model
    estimate = next(line for line in render(spec).script.splitlines() if "-m estpipe estimate" in line)
    assert estimate.endswith(f"--model {model} --optimizer bfgs")


def test_estimate_problems_are_the_command_lines_naming_spec_fields(tmp_path):
    path = write_spec(tmp_path, '[data]\npath = "d.h5"\n[estimate]\nderivatives = "adjoint"\ntol = "small"\nstart = [1, "a"]\n')
    assert [line.strip() for line in problems_of(path)[1:]] == [
        "estimate.start: entry 2 ('a') is not a number; give numbers, one per parameter",
        "estimate.tol must be a positive number, got 'small'",
        "estimate.derivatives adjoint gives only the gradient of Q, but gauss-newton needs the moment Jacobian G; "
        "use estimate.optimizer bfgs or l-bfgs-b with adjoint, or estimate.derivatives dual",
    ]


def test_unknown_backend_gets_its_message(tmp_path):
    path = write_spec(tmp_path, '[data]\npath = "d.h5"\n[backend]\nkind = "slrum"\n')
    (line,) = problems_of(path)[1:]
    assert line.strip() == "backend.kind: 'slrum' is not allowed; one of local, dask, slurm, pbs (did you mean 'slurm'?)"


def test_missing_data_path_gets_its_message(tmp_path):
    path = write_spec(tmp_path, "[data]\nsets = 100\n")
    lines = problems_of(path)
    assert lines[0].endswith("has 1 problem:")
    assert lines[1].strip().startswith("data.path: missing; give the choice-data file (HDF5)")
    assert "data: missing table" in problems_of(write_spec(tmp_path, "[estimate]\nsteps = 1\n", "nodata.toml"))[1]


def test_load_spec_whose_input_is_missing(tmp_path):
    path = write_spec(tmp_path, '[data]\npath = "d.h5"\ninput = "nope.csv"\nset_col = "s"\nchoice_col = "c"\nx = ["a", "b"]\nz = ["a"]\ndm = ["m"]\n')
    body = "\n".join(problems_of(path))
    assert "data.input: " + repr(str(tmp_path / "nope.csv")) + " does not exist" in body
    assert "data.z: give either z (instruments) or dm" in body


def test_dask_backend_needs_one_address(tmp_path):
    body = "\n".join(problems_of(write_spec(tmp_path, '[data]\npath = "d.h5"\n[backend]\nkind = "dask"\n')))
    assert "kind 'dask' needs address" in body
    spec = load_job_spec(write_spec(tmp_path, '[data]\npath = "d.h5"\n[backend]\nkind = "dask"\nscheduler_file = "s.json"\n', "ok.toml"))
    assert spec.backend.scheduler_file == tmp_path / "s.json"


def test_not_toml_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"is not valid TOML: .*line 1"):
        load_job_spec(write_spec(tmp_path, "[data\n"))
    with pytest.raises(UserError, match="does not exist"):
        load_job_spec(tmp_path / "missing.toml")


def test_rendered_pbs_script_equals_the_expected_file():
    rendered = render_pbs(load_job_spec(JOBS / "pbs.toml"), python="/usr/bin/python3")
    assert rendered.script == (EXPECTED / "pbs.pbs").read_text()


def slurm_spec(tmp_path, extra_backend: str = "") -> Path:
    return write_spec(tmp_path, f"""
[data]
path = "data dir/data.h5"
sets = 200
[estimate]
steps = 1
tol = 1e-9
start = [0.5, -1]
[backend]
kind = "slurm"
workers = 3
cores = 2
memory = "3GB"
walltime = "00:20:00"
partition = "debug"
{extra_backend}
[output]
results = "out/results.json"
""")


def test_slurm_script_requeues_appends_and_resumes(tmp_path):
    spec = load_job_spec(slurm_spec(tmp_path))
    script = render_slurm(spec).script
    lines = script.splitlines()
    for directive in ["--requeue", "--open-mode=append", "--ntasks=3", "--cpus-per-task=2", "--mem-per-cpu=1500M",
                      "--time=00:20:00", "--partition=debug", f"--output={tmp_path}/logs/job-%j.out"]:
        assert f"#SBATCH {directive}" in lines
    assert f"PYTHON={sys.executable}" in lines
    estimate = next(line for line in lines if "-m estpipe estimate" in line)
    assert '--checkpoint "$CHECKPOINT" --resume --out "$RESULTS"' in estimate
    assert estimate.endswith("--steps 1 --tol 1e-09 --start 0.5,-1.0")
    # The path with a space is quoted once, where the variable is set.
    assert f"DATA='{tmp_path}/data dir/data.h5'" in lines
    assert "srun --ntasks=3 --cpus-per-task=2" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_a_load_spec_script_loads_into_the_data_path(tmp_path):
    (tmp_path / "trips.csv").write_text("trip,chosen,cost,time,mode\n")
    spec = load_job_spec(write_spec(tmp_path, """
[data]
path = "d.h5"
input = "trips.csv"
set_col = "trip"
choice_col = "chosen"
x = ["cost", "time"]
alt_col = "mode"
asc = true
[backend]
kind = "slurm"
"""))
    lines = render(spec).script.splitlines()
    load = next(line for line in lines if "-m estpipe load" in line)
    assert load.strip() == (f'"$PYTHON" -m estpipe load {tmp_path}/trips.csv "$DATA" --set-col trip --choice-col chosen '
                            "--x cost,time --alt-col mode --asc")
    assert f"DATA={tmp_path}/d.h5" in lines


def test_loading_a_specs_data_names_the_specs_fields(tmp_path):
    (tmp_path / "trips.csv").write_text("trip,chosen,cost\n1,1,2.0\n1,0,3.0\n2,0,1.0\n2,1,4.0\n")
    path = write_spec(tmp_path, '[data]\npath = "d.h5"\ninput = "trips.csv"\nset_col = "trip"\nchoice_col = "chosen"\n'
                                'x = ["cost", "time"]\n')
    done = subprocess.run([sys.executable, "-m", "estpipe", "run", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "no column 'time' (asked by data.x)" in done.stderr and done.stderr.count("\n") == 2, done.stderr
    assert not (tmp_path / "d.h5").exists()


def test_setup_lines_run_after_the_default_python_so_they_can_replace_it(tmp_path):
    spec = load_job_spec(slurm_spec(tmp_path, 'setup = ["module load python", "PYTHON=python3"]'))
    lines = render(spec).script.splitlines()
    assert lines.index(f"PYTHON={sys.executable}") < lines.index("module load python") < lines.index("PYTHON=python3")


def test_dry_run_prints_the_script_and_dask_specs_are_refused(tmp_path):
    path = slurm_spec(tmp_path)
    done = subprocess.run([sys.executable, "-m", "estpipe", "submit", str(path), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == render(load_job_spec(path)).script
    assert not (tmp_path / "logs").exists()
    # A local spec is submitted as a Slurm job with its own workers.
    done = subprocess.run([sys.executable, "-m", "estpipe", "submit", str(JOBS / "seed.toml"), "--dry-run"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --ntasks=1" in done.stdout and "--scheduler-file" in done.stdout
    # A spec that names an existing dask cluster has no batch system to submit to.
    dask_spec = write_spec(tmp_path, """
[data]
path = "data.h5"
sets = 100
[backend]
kind = "dask"
scheduler_file = "scheduler.json"
""")
    done = subprocess.run([sys.executable, "-m", "estpipe", "submit", str(dask_spec)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("estpipe: error: job spec") and "use `estpipe run`" in done.stderr


def test_run_after_a_crash_resumes_from_the_checkpoint(tmp_path):
    """`estpipe run`: makes the data, is killed mid-run (SIGKILL), and the second run resumes."""
    import json
    import os
    import signal
    import time

    import numpy as np

    from estpipe.orchestration import EstimateOptions, estimate

    path = write_spec(tmp_path, """
[data]
path = "data.h5"
sets = 10000
[output]
results = "results.json"
checkpoint = "checkpoint.json"
""")
    spec = load_job_spec(path)
    command = [sys.executable, "-m", "estpipe", "run", str(path)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120

    def evaluations() -> int:
        try:
            return json.loads(spec.output.checkpoint.read_text())["evaluations"]
        except (OSError, ValueError, KeyError):
            return 0

    while evaluations() < 2:
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not spec.output.results.exists()
    assert spec.data.path.exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "data: " + str(spec.data.path) + " (exists)" in second.stderr
    assert "resuming from " + str(spec.output.checkpoint) in second.stderr
    assert "two-step GMM" in second.stdout  # the same table as estpipe estimate
    resumed = json.loads(spec.output.results.read_text())
    assert resumed["resumed"]["evaluations_before"] >= 2

    fresh = estimate(spec.data.path, EstimateOptions())
    assert resumed["evaluations"] < fresh.evaluations
    np.testing.assert_allclose(resumed["params"], fresh.params, rtol=1e-6)
    assert os.path.getsize(spec.output.results) > 0


def test_a_mixed_logit_simulate_spec_renders_its_options_and_runs_them(tmp_path):
    """[data] takes simulate's model-design options; the batch script passes them to `estpipe
    simulate` as the command line spells them, and `estpipe run` makes the same data."""
    spec = load_job_spec(write_spec(tmp_path, """
[data]
path = "ml.h5"
design = "mixed-logit"
sets = 60
alternatives = 3
params = 3
moments = 9
random = ["x1", "x3:-lognormal"]
correlated = true
panel_size = 4
[backend]
kind = "slurm"
"""))
    assert (spec.data.random, spec.data.correlated, spec.data.panel_size, spec.data.nests) == ("x1,x3:-lognormal", True, 4, None)
    line = next(line for line in render(spec).script.splitlines() if "-m estpipe simulate" in line)
    words = line.strip().split()
    assert words[words.index("--design") + 1] == "mixed-logit" and words[words.index("--random") + 1] == "x1,x3:-lognormal"
    assert "--correlated" in words and words[words.index("--panel-size") + 1] == "4" and "--nests" not in words
    # the rendered command makes what the spec's arguments make
    from estpipe.data.format import ChoiceDataFile
    from estpipe.data.simulate import simulate_choice_data

    simulate_choice_data(tmp_path / "api.h5", **spec.data.arguments())
    done = subprocess.run([sys.executable, "-m", "estpipe", "simulate", str(tmp_path / "cli.h5"),
                           *words[words.index('"$DATA"') + 1 :]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with ChoiceDataFile(tmp_path / "api.h5") as a, ChoiceDataFile(tmp_path / "cli.h5") as b:
        assert np.array_equal(a.read_sets().X, b.read_sets().X) and np.array_equal(a.read_panel(), b.read_panel())
        assert a.truth_names == b.truth_names and np.array_equal(a.truth, b.truth)


def test_a_nested_logit_spec_and_a_panel_load_spec(tmp_path):
    spec = load_job_spec(write_spec(tmp_path, '[data]\npath = "n.h5"\ndesign = "nested-logit"\nnests = 3\n'))
    assert spec.data.nests == 3 and spec.data.arguments()["nests"] == 3
    (tmp_path / "trips.csv").write_text("trip,person,chosen,cost,mode\n")
    spec = load_job_spec(write_spec(tmp_path, '[data]\npath = "d.h5"\ninput = "trips.csv"\nset_col = "trip"\n'
                                              'choice_col = "chosen"\nx = ["cost"]\nalt_col = "mode"\npanel_col = "person"\n'
                                              '[backend]\nkind = "slurm"\n', name="load.toml"))
    line = next(line for line in render(spec).script.splitlines() if "-m estpipe load" in line)
    assert line.strip().endswith("--x cost --alt-col mode --panel-col person")


def test_model_design_options_for_the_wrong_design_are_problems(tmp_path):
    lines = problems_of(write_spec(tmp_path, '[data]\npath = "d.h5"\nnests = 2\npanel_size = 3\nrandom = 2\n'
                                             '[estimate]\nmodel = "logit"\n'))
    assert lines[0].endswith("has 3 problems:")
    assert "  data.random: is for design 'mixed-logit', not 'logit'" in lines
    assert "  data.panel_size: is for design 'mixed-logit', not 'logit'" in lines
    assert "  data.nests: is for design 'nested-logit', not 'logit'" in lines
    lines = problems_of(write_spec(tmp_path, '[data]\npath = "d.h5"\ndesign = "mixed-logit"\ncluster_size = 5\n'))
    assert lines[1] == "  data.cluster_size: is for the logit design, not 'mixed-logit' (decision makers: panel_size)"
