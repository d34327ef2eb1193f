"""Where the command line sends a run's progress (stderr) and how a run becomes an exit code.

On a terminal the accepted iterations are one status line, redrawn in place (rich, as the
progress bars of `estpipe simulate`): step, iteration, objective, seconds per evaluation and the
time elapsed, which goes on counting while an evaluation runs; log lines print above it. Anywhere
else (a file, a pipe, a batch job's log) every accepted iteration is its own plain line, so the
log keeps the whole history.
"""

from __future__ import annotations

import math
import os
import sys
import time

from estpipe import interrupts
from estpipe.errors import EXIT_NOT_CONVERGED, EXIT_OK
from estpipe.estimation.gmm import Reporter
from estpipe.estimation.optimizers import IterationRecord
from estpipe.text import count

# Redraws of the status line per second (its elapsed time moves between iterations).
REFRESH_PER_SECOND = 4


def plain_iteration_line(r: IterationRecord) -> str:
    return (f"step {r.step} iter {r.iteration:3d}  {r.objective_name} = {r.objective:.10e}  |grad|inf = {r.grad_norm:.3e}  "
            f"|step| = {r.step_norm:.3e}  {r.seconds:7.2f} s  ({count(r.evaluations, 'evaluation')})")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StderrReporter(Reporter):
    """Log lines and the accepted iterations on stderr: a live status line on a terminal, one
    plain line per iteration elsewhere (see the module docstring). A context manager: the status
    line is drawn from __enter__ to __exit__, and left showing the last iteration."""

    def __init__(self, stream=None, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.t0 = time.monotonic()
        self.last: IterationRecord | None = None
        self._live = self._console = self._restore = None

    # -- the context: the status line's lifetime

    def __enter__(self) -> "StderrReporter":
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream, highlight=False, soft_wrap=False)
            # writes to sys.stderr while the line is up (warnings) go above it, not through it; stdout
            # is left alone (it may be a file: --json > results.json)
            self._live = Live(self, console=self._console, refresh_per_second=REFRESH_PER_SECOND, transient=False,
                              redirect_stdout=False, redirect_stderr=True)
            # a signal ends the process without unwinding (estpipe.interrupts): give the cursor back
            self._restore = interrupts.register(self._restore_terminal, "the terminal under the status line")
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.stop()
        interrupts.unregister(self._restore)
        self._restore = None

    def _restore_terminal(self) -> None:
        """The interrupt action: show the cursor rich hid, and end the status line (one raw write,
        no lock: the interrupted code may hold the console's)."""
        os.write(self.stream.fileno(), b"\x1b[?25h\n")

    # -- Reporter

    def log(self, message: str) -> None:
        if self._live is not None:
            self._console.print(f"estpipe: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            print(f"estpipe: {message}", file=self.stream, flush=True)

    def iteration(self, r: IterationRecord) -> None:
        self.last = r
        if self._live is not None:
            self._live.refresh()
        else:
            print(plain_iteration_line(r), file=self.stream, flush=True)

    # -- the status line (rich calls this at every redraw)

    def status(self) -> str:
        """The status line (short enough for 80 columns)."""
        elapsed = f"{_clock(time.monotonic() - self.t0)} elapsed"
        r = self.last
        if r is None:
            return f"estpipe: starting, {elapsed}"
        per = r.seconds / r.evaluations if r.evaluations else math.nan
        return f"step {r.step}  iter {r.iteration}  {r.objective_name} = {r.objective:.6e}  {per:.3g} s/eval  {elapsed}"

    def __rich__(self):
        from rich.text import Text

        return Text(self.status(), no_wrap=True, overflow="ellipsis", style="bold")


def _is_terminal(stream) -> bool:
    """stream is a terminal that can redraw a line (not TERM=dumb)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return bool(tty) and os.environ.get("TERM", "") != "dumb"


def run_estimate(path: str | os.PathLike, options, stdout=None, stderr=None) -> int:
    """What `estpipe estimate` does: estimate, print a table (or JSON with options.json) on
    stdout, progress on stderr; returns the exit code (0 converged, 3 not converged).
    UserError propagates (the CLI prints it, exit code 2); when the results file could not be
    written, the results are printed first."""
    from estpipe.orchestration import estimate
    from estpipe.orchestration.estimate import ResultsNotWritten

    stdout = stdout or sys.stdout
    try:
        with StderrReporter(stderr or sys.stderr) as reporter:
            results = estimate(path, options, reporter=reporter)
    except ResultsNotWritten as exc:
        # the results first, where they cannot be lost; then the CLI prints the error line
        print(exc.results.to_json() if options.json else exc.results.table(), file=stdout, flush=True)
        raise
    print(results.to_json() if options.json else results.table(), file=stdout, flush=True)
    return EXIT_OK if results.converged else EXIT_NOT_CONVERGED
