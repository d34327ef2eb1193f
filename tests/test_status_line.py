"""`estpipe estimate`'s progress: under a real pseudo-terminal one status line redrawn in place
(step, iteration, objective, seconds per evaluation, elapsed), for GMM and MLE; without a terminal
the plain line per accepted iteration, as before. The figures on the line are the run's own (its
results JSON), not just its labels."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest

from estpipe.data.simulate import simulate_choice_data

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STATUS = re.compile(r"step (\d)  iter (\d+)  (Q|-loglik) = (\S+)  (\S+) s/eval  (\d+:\d\d) elapsed")
PLAIN = re.compile(r"^step (\d) iter +(\d+)  Q = (\S+)  \|grad\|inf = \S+  \|step\| = \S+ +\d+\.\d\d s  "
                   r"\((\d+) evaluations?\)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("status") / "d.h5"
    simulate_choice_data(path, sets=800, alternatives=(5, 5), params=3, moments=6, seed=5)
    return path


def run_on_a_terminal(args: list[str], columns: int = 120, timeout: float = 60,
                      interrupt_on: str | None = None) -> tuple[int, str, str]:
    """`python -m estpipe ARGS` with stderr on a pseudo-terminal (stdout a pipe, as with --json > file);
    (exit code, what the terminal received, stdout). interrupt_on: SIGINT once the terminal shows it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(columns))
    proc = subprocess.Popen([sys.executable, "-m", "estpipe", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    received, out, deadline = bytearray(), bytearray(), time.monotonic() + timeout
    open_ = {master: received, proc.stdout.fileno(): out}
    try:
        while open_:  # until both the terminal and stdout reach their end
            ready, _, _ = select.select(list(open_), [], [], 0.1)
            for fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last writer closed it
                    chunk = b""
                if chunk:
                    open_[fd] += chunk
                else:
                    del open_[fd]
            if interrupt_on is not None and interrupt_on.encode() in received:
                proc.send_signal(signal.SIGINT)
                interrupt_on = None
            assert time.monotonic() < deadline, "estimate under a terminal did not finish"
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    proc.stdout.close()
    return proc.wait(), received.decode("utf-8", "replace"), out.decode()


def frames(terminal: str) -> list[str]:
    """The distinct lines the terminal showed: each redraw (after a carriage return) is one."""
    text = ANSI.sub("", terminal)
    return [part.strip() for line in text.split("\n") for part in line.split("\r") if part.strip()]


def test_gmm_on_a_terminal_shows_a_live_status_line(data):
    code, terminal, out = run_on_a_terminal(["estimate", str(data), "--steps", "2", "--json"])
    assert code == 0, terminal
    results = json.loads(out)
    shown = frames(terminal)
    statuses = [m for line in shown if (m := STATUS.fullmatch(line))]
    assert statuses, terminal
    # drawn in place: redraws go back to the line's start, and the plain lines are not printed
    assert "\r" in terminal and not [line for line in shown if PLAIN.match(line)]
    # the last status line is the run's last accepted iteration, with its objective
    last = statuses[-1]
    step2 = results["steps"][-1]
    assert (int(last[1]), int(last[2]), last[3]) == (2, step2["iterations"], "Q")
    assert float(last[4]) == pytest.approx(step2["objective"], rel=1e-5)
    assert float(last[5]) > 0
    assert {int(m[1]) for m in statuses} == {1, 2}  # both steps passed through the line
    # log lines still print, above the status line
    assert any(line.startswith("estpipe: step 1: W = I") for line in shown)
    assert any(line.startswith("estpipe: step 2 converged") for line in shown)


def test_mle_on_a_terminal_shows_its_iterations_too(data):
    code, terminal, out = run_on_a_terminal(["estimate", str(data), "--estimator", "mle", "--json"])
    assert code == 0, terminal
    results = json.loads(out)
    statuses = [m for line in frames(terminal) if (m := STATUS.fullmatch(line))]
    assert statuses and statuses[-1][3] == "-loglik", terminal
    assert float(statuses[-1][4]) == pytest.approx(-results["loglik"], rel=1e-6)
    iterations = [int(m[2]) for m in statuses]
    # the optimizer's iterations, then the BHHH polish steps, counted on
    assert iterations == sorted(iterations) and iterations[-1] == results["steps"][0]["iterations"] >= 2


def test_without_a_terminal_the_plain_lines_are_unchanged(data):
    done = subprocess.run([sys.executable, "-m", "estpipe", "estimate", str(data), "--steps", "2", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert "\x1b" not in done.stderr and "\r" not in done.stderr
    lines = done.stderr.splitlines()
    plain = [m for line in lines if (m := PLAIN.match(line))]
    # one line per accepted iteration of each step, numbered 1.. within it
    for step in (1, 2):
        numbers = [int(m[2]) for m in plain if int(m[1]) == step]
        assert numbers == list(range(1, results["steps"][step - 1]["iterations"] + 1))
    assert float(plain[-1][3]) == pytest.approx(results["steps"][-1]["objective"], rel=1e-9)
    assert all(line.startswith("estpipe: ") or PLAIN.match(line) for line in lines), done.stderr
    assert not any(STATUS.search(line) for line in lines)


def test_an_interrupt_gives_the_terminal_its_cursor_back(data):
    """rich hides the cursor while the line is up; Ctrl-C ends estpipe without unwinding
    (estpipe.interrupts), so its action must show the cursor again."""
    code, terminal, _ = run_on_a_terminal(["estimate", str(data), "--workers", "2"], interrupt_on="estpipe: starting")
    assert code == -signal.SIGINT, terminal
    hide, show = "\x1b[?25l", "\x1b[?25h"
    assert hide in terminal and terminal.rindex(show) > terminal.rindex(hide), terminal
