"""The dask dashboard: off unless asked for, everywhere a scheduler starts (estpipe's LocalCluster,
a jobqueue cluster's scheduler, the batch scripts' `dask scheduler`), and served on loopback when
asked (`--dashboard`, [backend] dashboard = true). Real dask schedulers and workers, real HTTP:
the URL the run logs answers 200 while the run goes; without the flag no port of the run serves
the dashboard's /status and nothing listens beyond loopback."""

from __future__ import annotations

import os
import http.client
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import one_error_line
from estpipe.data.simulate import simulate_choice_data
from estpipe.execution.clusters import dashboard_line
from estpipe.jobs import load_job_spec, render
from estpipe.orchestration import EstimateOptions, Reporter, estimate

pytest.importorskip("bokeh", reason="the dashboard needs bokeh (pip install \"estpipe[dashboard]\")")

URL = re.compile(r"^dashboard: (http://\S+/status)")
SCHEDULER = re.compile(r"at tcp://([\d.]+):(\d+)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dashboard") / "d.h5"
    simulate_choice_data(path, sets=600, alternatives=(5, 5), params=3, moments=6, seed=3)
    return path


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """The HTTP status of GET url; None when nothing HTTP answers there."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return None


def listening(process: psutil.Process) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


class Probe(Reporter):
    """A reporter that, at the first accepted iteration (the cluster up, the estimation under way),
    runs `check(log lines so far)` and keeps what it returns."""

    def __init__(self, check):
        self.check, self.lines, self.found = check, [], None

    def log(self, message: str) -> None:
        self.lines.append(message)

    def iteration(self, record) -> None:
        if self.found is None:
            self.found = self.check(self.lines)


def test_the_dashboard_answers_during_a_run_with_workers_and_dashboard(data):
    def check(lines):
        urls = [m[1] for line in lines if (m := URL.match(line))]
        assert len(urls) == 1, lines
        port = int(urls[0].rsplit(":", 1)[1].split("/")[0])
        bound = {ip for ip, p in listening(psutil.Process()) if p == port}
        return urls[0], http_status(urls[0]), bound

    probe = Probe(check)
    results = estimate(data, EstimateOptions(workers=2, steps=1, dashboard=True), reporter=probe)
    assert results.converged
    url, status, bound = probe.found
    assert url.startswith("http://127.0.0.1:") and status == 200
    assert bound == {"127.0.0.1"}  # loopback only, not every interface
    line = next(line for line in probe.lines if URL.match(line))
    assert f"ssh -L {url.split(':')[2].split('/')[0]}:localhost:" in line
    assert http_status(url, timeout=1) is None  # gone with the run


def test_without_the_flag_no_port_of_the_run_serves_a_dashboard(data):
    """What listens during a --workers 2 run: in this process the scheduler (its comm, its HTTP
    server) and the workers' nannies; in the worker processes their own ports. All on loopback, and
    the scheduler's HTTP server (its dashboard link's port) answers /health but not /status."""
    from distributed import Client

    me = psutil.Process()
    before = listening(me)

    def check(lines):
        scheduler = next(SCHEDULER.search(line) for line in lines if line.startswith("dask:"))
        comm = (scheduler[1], int(scheduler[2]))
        with Client(f"tcp://{comm[0]}:{comm[1]}", timeout=10, set_as_default=False) as client:
            info = client.scheduler_info(n_workers=-1)
            link = client.dashboard_link
        http = (comm[0], info["services"]["dashboard"])
        nannies = {tuple(w["nanny"].split("://")[1].rsplit(":", 1)) for w in info["workers"].values()}
        nannies = {(ip, int(port)) for ip, port in nannies}
        children = set().union(*(listening(c) for c in me.children(recursive=True)))
        url = f"http://{http[0]}:{http[1]}"
        return (link, listening(me) - before, {comm, http} | nannies, children,
                http_status(url + "/status"), http_status(url + "/health"))

    probe = Probe(check)
    estimate(data, EstimateOptions(workers=2, steps=1), reporter=probe)
    link, mine, expected, children, status, health = probe.found
    assert not any(URL.match(line) or "dashboard" in line for line in probe.lines), probe.lines
    assert mine == expected  # nothing else listens in this process
    assert {ip for ip, _ in mine | children} == {"127.0.0.1"}  # every socket of the run: loopback
    # dask always runs the scheduler's HTTP server (/health answers), but it serves no dashboard
    assert health == 200 and status == 404, (link, health, status)


def test_a_dashboard_without_bokeh_is_one_line_with_the_extra(data):
    code = ("import sys; sys.modules['bokeh'] = None; from estpipe.cli.app import main; "
            f"main(['estimate', {str(data)!r}, '--workers', '2', '--dashboard'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert one_error_line(done.stderr) == ('estpipe: error: --dashboard needs bokeh, which is not installed; '
                                           'pip install "estpipe[dashboard]"')
    done = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(data), "--dashboard"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--workers 1 runs in-process" in one_error_line(done.stderr)


def _spec(tmp_path: Path, kind: str, dashboard: bool) -> Path:
    path = tmp_path / f"{kind}-{dashboard}.toml"
    path.write_text(f"""
[data]
path = "d.h5"
sets = 100
[estimate]
steps = 1
[backend]
kind = "{kind}"
workers = 2
{'dashboard = true' if dashboard else ''}
""")
    return path


def _scheduler_command(script: str) -> str:
    line = next(line for line in script.splitlines() if " -m dask scheduler " in line)
    assert line.endswith(" &")
    return line[:-2]


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_rendered_batch_scripts_ask_for_a_dashboard_only_when_the_spec_does(tmp_path, kind):
    off = render(load_job_spec(_spec(tmp_path, kind, False))).script
    on = render(load_job_spec(_spec(tmp_path, kind, True))).script
    for script in (off, on):
        assert "8787" not in script and "--dashboard-address :" not in script
        assert "--dashboard-address 127.0.0.1:0" in _scheduler_command(script)
    assert "--no-dashboard" in _scheduler_command(off) and " --dashboard " not in _scheduler_command(off)
    assert " --dashboard " in _scheduler_command(on)
    estimate_off, estimate_on = (next(line for line in s.splitlines() if "-m estpipe estimate" in line) for s in (off, on))
    assert "--dashboard" not in estimate_off and " --dashboard" in estimate_on
    # `estpipe submit --dry-run` prints that script
    done = subprocess.run([sys.executable, "-m", "estpipe", "submit", str(_spec(tmp_path, kind, False)), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == off, done.stderr


def _run_scheduler(command: str, tmp_path: Path):
    """The rendered scheduler command, run as the script runs it; (process, its scheduler file)."""
    sf = tmp_path / f"scheduler-{time.monotonic_ns()}.json"
    env = dict(os.environ, PYTHON=sys.executable, SCHEDULER_FILE=str(sf), DASK_LOGGING__DISTRIBUTED="error")
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sf.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the rendered dask scheduler did not start"
        time.sleep(0.1)
    time.sleep(0.3)  # the file is written once listening; let its writer finish
    return proc, sf


def test_the_rendered_scheduler_serves_the_dashboard_only_when_asked(tmp_path):
    """The batch script's own `dask scheduler` line, run: off, its HTTP server on loopback answers
    /health but not /status, and `estimate --dashboard` on it warns; on, /status answers on
    loopback and the log line gives the ssh tunnel."""
    from distributed import Client

    for dashboard in (False, True):
        command = _scheduler_command(render(load_job_spec(_spec(tmp_path, "slurm", dashboard))).script)
        proc, sf = _run_scheduler(command, tmp_path)
        try:
            with Client(scheduler_file=str(sf), timeout=20, set_as_default=False) as client:
                comm_port = int(client.scheduler.address.rsplit(":", 1)[1])
                other = {a for a in listening(psutil.Process(proc.pid)) if a[1] != comm_port}
                assert other and {ip for ip, _ in other} == {"127.0.0.1"}, other
                (ip, port), = other
                assert http_status(f"http://127.0.0.1:{port}/health") == 200
                assert http_status(f"http://127.0.0.1:{port}/status") == (200 if dashboard else 404)
                line = dashboard_line(client, local=False)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
        if dashboard:
            assert f"at 127.0.0.1:{port} only" in line and f"ssh -L {port}:localhost:{port} " in line, line
        else:
            assert line.startswith("warning: dashboard: the dask scheduler at tcp://") and "serves no dashboard" in line, line


def test_a_jobqueue_clusters_scheduler_serves_a_dashboard_only_when_asked(tmp_path):
    """dask-jobqueue's scheduler (in this process; no job is submitted here): no dashboard and
    loopback HTTP by default, the dashboard on loopback with dashboard=True."""
    import shutil

    from estpipe.execution.jobqueue import JobQueue

    if shutil.which("sbatch") is None:
        pytest.skip("dask-jobqueue's SLURMCluster needs sbatch on PATH")
    for dashboard in (False, True):
        cluster = JobQueue("slurm", 1, log_dir=tmp_path / "logs", interface="lo", scheduler_host="127.0.0.1",
                           dashboard=dashboard)._dask_cluster()
        try:
            port = cluster.scheduler_info["services"]["dashboard"]
            status = http_status(f"http://127.0.0.1:{port}/status")
            bound = {ip for ip, p in listening(psutil.Process()) if p == port}
        finally:
            cluster.close()
        assert bound == {"127.0.0.1"} and status == (200 if dashboard else 404), (bound, status)


def test_a_specs_backend_dashboard_flows_to_the_estimate_options(tmp_path):
    from estpipe.errors import UserError
    from estpipe.jobs.run import estimate_options

    spec = load_job_spec(_spec(tmp_path, "local", True))
    assert estimate_options(spec).dashboard is True and estimate_options(spec).workers == 2
    assert estimate_options(load_job_spec(_spec(tmp_path, "local", False))).dashboard is False
    for text, expected in (('kind = "local"\ndashboard = true', "backend.dashboard: shows a dask cluster's work"),
                           ('kind = "slurm"\ndashboard = "yes"', "backend.dashboard: 'yes' is not allowed; true or false")):
        path = tmp_path / "bad.toml"
        path.write_text(f'[data]\npath = "d.h5"\nsets = 100\n[backend]\n{text}\n')
        with pytest.raises(UserError) as info:
            load_job_spec(path)
        assert expected in str(info.value), str(info.value)
