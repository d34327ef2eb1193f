"""The user's own model: a class in the user's file (`--model my_models.py:Class`) or installed
through the `estpipe.models` entry point group. A user file that writes the logit equals the
built-in logit; workers import the file (real dask workers); the partition key and the checkpoint
change with the file's contents; every mistake is one line with exit 2 through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from estpipe.data.simulate import simulate_choice_data
from estpipe.errors import UserError
from estpipe.execution.tasks import PartitionSource
from estpipe.kernel import PartitionKernel
from estpipe.kernel.generic import GenericDual
from estpipe.models import resolve
from estpipe.models.spec import ModelSpec
from estpipe.orchestration import EstimateOptions, estimate
from estpipe.data.problem import read_problem

REPO = Path(__file__).parents[1]
PIPELINE = REPO / "pipeline"
EXAMPLE = REPO / "examples" / "wtp_space.py"

USER_LOGIT = """\
from estpipe.dual import linear
from estpipe.models import Model


class MyLogit(Model):
    def utilities(self, theta, tile):
        return linear(tile.X, theta)
"""


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra.pop("paths", []), str(PIPELINE)])
    env.update(extra)
    return env


def cli(args, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "estpipe", *map(str, args)], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    path = folder / "data.h5"
    simulate_choice_data(path, sets=1200, alternatives=(2, 6), params=3, moments=6, seed=4)
    (folder / "my_models.py").write_text(USER_LOGIT)
    return path


def test_a_user_file_that_writes_the_logit_is_the_logit(data, monkeypatch):
    """Jacobian to 1e-12 of max|G| (fused logit against the generic path on the user's class,
    at random parameters, tiles and variable set sizes), and the two-step estimates to 1e-8."""
    from estpipe.data.format import ChoiceDataFile

    user = resolve(f"{data.parent / 'my_models.py'}:MyLogit")
    with ChoiceDataFile(data) as f:
        d = f.read_sets(0, f.n_sets)
    rng = np.random.default_rng(0)
    for tile_rows in (7, 1000, None):
        builtin = PartitionKernel(d, model="logit", tile_rows=tile_rows)
        mine = PartitionKernel(d, model=user, tile_rows=tile_rows)
        assert isinstance(mine.strategy, GenericDual) and not isinstance(builtin.strategy, GenericDual)
        for _ in range(3):
            b = rng.normal(size=3)
            ref, got = builtin.sums(b, covariance=True), mine.sums(b, covariance=True)
            scale = np.abs(ref.gG).max()
            assert np.abs(got.gG - ref.gG).max() <= 1e-12 * scale
            np.testing.assert_allclose(got.hh, ref.hh, rtol=1e-12, atol=1e-12 * np.abs(ref.hh).max())
            assert got.loglik == pytest.approx(ref.loglik, rel=1e-12)
            v = rng.normal(size=6)
            np.testing.assert_allclose(mine.pullback(b, v), builtin.pullback(b, v), rtol=1e-12,
                                       atol=1e-12 * np.abs(builtin.pullback(b, v)).max())
    monkeypatch.chdir(data.parent)
    r_user = estimate(data, EstimateOptions(model="my_models.py:MyLogit"))
    r_logit = estimate(data, EstimateOptions())
    assert r_user.converged and r_logit.converged
    np.testing.assert_allclose(r_user.params, r_logit.params, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(r_user.std_errors, r_logit.std_errors, rtol=1e-6)


def test_workers_import_the_file_and_equal_in_process(data):
    """Two real dask worker processes started elsewhere (cwd /) import the user's file by its
    absolute path and give the in-process estimate to 1e-10."""
    folder = data.parent
    out1, out2 = folder / "r1.json", folder / "r2.json"
    one = cli(["estimate", data, "--model", "my_models.py:MyLogit", "--out", out1], cwd=folder)
    two = cli(["estimate", data, "--model", "my_models.py:MyLogit", "--workers", "2", "--out", out2], cwd=folder)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    r1, r2 = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert r2["workers"] == 2 and r2["partitions"] == 2
    np.testing.assert_allclose(r2["params"], r1["params"], rtol=1e-10, atol=1e-10)


def test_the_key_and_the_checkpoint_change_when_the_file_is_edited(tmp_path, monkeypatch):
    path = tmp_path / "d.h5"
    simulate_choice_data(path, sets=300, alternatives=(3, 3), params=2, moments=4, seed=1)
    model = tmp_path / "m.py"
    model.write_text(USER_LOGIT)
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.of("m.py:MyLogit")
    assert spec.name == f"{model}:MyLogit" and len(spec.digest) == 64  # absolute path, sha256
    problem = read_problem(path)
    key = PartitionSource.of(problem, spec, "dual").key(0, 300)
    ckpt = tmp_path / "run.ckpt"
    first = estimate(path, EstimateOptions(model="m.py:MyLogit", checkpoint=str(ckpt)))
    # the same file: the checkpoint is taken
    again = estimate(path, EstimateOptions(model="m.py:MyLogit", checkpoint=str(ckpt), resume=True))
    np.testing.assert_allclose(again.params, first.params, rtol=1e-10)

    model.write_text(USER_LOGIT + "\n# edited\n")
    edited = ModelSpec.of("m.py:MyLogit")
    assert edited.digest != spec.digest and edited.key() != spec.key()
    assert PartitionSource.of(problem, edited, "dual").key(0, 300) != key
    with pytest.raises(UserError, match="other options"):
        estimate(path, EstimateOptions(model="m.py:MyLogit", checkpoint=str(ckpt), resume=True))
    # a worker whose copy is not the file the run started with refuses it
    with pytest.raises(UserError, match="changed since the run started"):
        spec.build(problem)


# A PEP 517 build backend in the throwaway package itself (backend-path), so pip builds its wheel
# without fetching setuptools and wheel from an index: a real wheel, with its entry_points.txt.
TINY_BACKEND = """\
import base64, hashlib, os, zipfile

NAME, VERSION = "tinylogit", "0.1"
DIST = f"{NAME}-{VERSION}.dist-info"
FILES = {
    "tinylogit/__init__.py": open("tinylogit/__init__.py").read(),
    f"{DIST}/METADATA": f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n",
    f"{DIST}/WHEEL": "Wheel-Version: 1.0\\nGenerator: tiny\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    f"{DIST}/entry_points.txt": "[estpipe.models]\\ntiny-logit = tinylogit:TinyLogit\\n",
}


def _record(text):
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(text.encode())}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, text in FILES.items():
            z.writestr(path, text)
        record = "".join(f"{p},{_record(t)}\\n" for p, t in FILES.items()) + f"{DIST}/RECORD,,\\n"
        z.writestr(f"{DIST}/RECORD", record)
    return name
"""


def test_an_installed_model_through_the_entry_point_group(data, tmp_path):
    """A throwaway package with an `estpipe.models` entry point, pip-installed into a target
    folder, is found by name through the real CLI."""
    pkg = tmp_path / "pkg"
    (pkg / "tinylogit").mkdir(parents=True)
    (pkg / "tinylogit" / "__init__.py").write_text(USER_LOGIT.replace("MyLogit", "TinyLogit"))
    (pkg / "tiny_backend.py").write_text(TINY_BACKEND)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = []
        build-backend = "tiny_backend"
        backend-path = ["."]
        """))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(pkg)], cwd=pkg, capture_output=True, text=True,
                         timeout=300)
    assert pip.returncode == 0, pip.stderr
    out = tmp_path / "r.json"
    run = cli(["estimate", data, "--model", "tiny-logit", "--out", out], cwd=tmp_path, paths=[str(site)])
    assert run.returncode == 0, run.stderr
    logit = cli(["estimate", data, "--json"], cwd=tmp_path)
    np.testing.assert_allclose(json.loads(out.read_text())["params"], json.loads(logit.stdout)["params"], rtol=1e-8)
    # without the package on the path the name is unknown, and the message says how models are named
    missing = cli(["estimate", data, "--model", "tiny-logit"], cwd=tmp_path)
    assert missing.returncode == 2 and "unknown model 'tiny-logit'" in missing.stderr


BAD = {
    "syntax.py": "from estpipe.models import Model\nclass A(Model)\n    pass\n",
    "raises.py": "from estpipe.models import Model\nx = 1\ny = x / 0\n",
    "models.py": textwrap.dedent("""\
        from estpipe.dual import linear
        from estpipe.models import Model


        class NotAModel:
            pass


        class Raises(Model):
            def utilities(self, theta, tile):
                u = linear(tile.X, theta)
                return u + undefined_name


        class WrongShape(Model):
            def utilities(self, theta, tile):
                return linear(tile.X[:5], theta)


        class NotADual(Model):
            def probabilities(self, theta, tile):
                return tile.X[:, 0]
        """),
}


@pytest.mark.parametrize(("model", "expected"), [
    pytest.param("nofile.py:A", ["no such file nofile.py", "path/to/my_models.py:ClassName"], id="no-such-file"),
    pytest.param("syntax.py:A", ["syntax.py line 2: syntax error"], id="syntax-error"),
    pytest.param("raises.py:A", ["importing", "raises.py raised ZeroDivisionError", "raises.py line 3"], id="raises-on-import"),
    pytest.param("models.py:Nope", ["has no class Nope", "the model classes in it: Raises, WrongShape, NotADual"],
                 id="no-such-class"),
    pytest.param("models.py:NotAModel", ["NotAModel in", "not a model", "subclass of estpipe.models.Model"],
                 id="not-a-model"),
    pytest.param("models.py:Raises", ["utilities raised NameError: name 'undefined_name' is not defined",
                                      "models.py line 12"], id="raises-inside"),
    pytest.param("models.py:WrongShape", ["utilities(theta, tile) returned a Dual block of shape (5, 4)",
                                          "must return a Dual of shape"], id="wrong-shape"),
    pytest.param("models.py:NotADual", ["probabilities(theta, tile) returned ndarray", "not a Dual"], id="not-a-dual"),
])
def test_a_bad_model_file_is_one_line_and_exit_2(data, tmp_path, model, expected):
    for name, text in BAD.items():
        (tmp_path / name).write_text(text)
    run = cli(["estimate", data, "--model", model, "--out", tmp_path / "r.json"], cwd=tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.startswith("estpipe: error:")]
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "r.json").exists()


def test_the_wtp_space_example_is_the_logit_reparametrized(tmp_path):
    """examples/wtp_space.py on the shipped modechoice data: its derived preference-space
    coefficients equal the logit's estimates and standard errors."""

    h5 = tmp_path / "mc.h5"
    load = cli(["load", REPO / "data" / "modechoice.csv", h5, "--set-col", "individual", "--choice-col", "choice",
                "--x", "invc,invt,ttme", "--alt-col", "mode", "--asc"], cwd=tmp_path)
    assert load.returncode == 0, load.stderr
    wtp = estimate(h5, EstimateOptions(model=f"{EXAMPLE}:WtpSpace"))
    logit = estimate(h5, EstimateOptions())
    assert wtp.converged and logit.converged
    derived = {d.name: d for d in wtp.derived}
    for k, name in enumerate(logit.param_names):
        assert derived[f"b_{name}"].estimate == pytest.approx(logit.params[k], rel=1e-6, abs=1e-9)
        assert derived[f"b_{name}"].std_error == pytest.approx(logit.std_errors[k], rel=1e-4)
    assert wtp.param_names[:2] == ["log_alpha", "wtp_invt"]


def test_a_pickled_user_model_imports_its_file_in_another_process(data, tmp_path):
    """A user model pickles as (path, class, sha256): a process that never imported the file
    unpickles it by importing the file itself."""
    import pickle

    model = resolve(f"{data.parent / 'my_models.py'}:MyLogit")
    blob = tmp_path / "model.pkl"
    blob.write_bytes(pickle.dumps(model))
    code = ("import pickle, sys; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(type(m).__name__, m.name, type(m).__module__.startswith('estpipe_user_'))")
    run = subprocess.run([sys.executable, "-c", code, str(blob)], env=_env(), capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["MyLogit", model.name, "True"]


def test_a_job_specs_model_file_is_relative_to_the_spec(tmp_path, monkeypatch):
    from estpipe.jobs.spec import load_job_spec

    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "m.py").write_text(USER_LOGIT)
    (folder / "job.toml").write_text('[data]\npath = "d.h5"\ndesign = "logit"\nsets = 100\n\n'
                                     '[estimate]\nmodel = "m.py:MyLogit"\n')
    monkeypatch.chdir(tmp_path)  # not the spec's folder
    spec = load_job_spec(folder / "job.toml")
    assert spec.estimate.model == f"{(folder / 'm.py').resolve()}:MyLogit"
    (folder / "job.toml").write_text('[data]\npath = "d.h5"\ndesign = "logit"\nsets = 100\n\n'
                                     '[estimate]\nmodel = "missing.py:MyLogit"\n')
    with pytest.raises(UserError, match="no such file"):
        load_job_spec(folder / "job.toml")
