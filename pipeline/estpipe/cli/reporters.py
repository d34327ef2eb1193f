"""Where the command line sends a run's progress (stderr) and how a run becomes an exit code."""

from __future__ import annotations

import os
import sys

from estpipe.errors import EXIT_NOT_CONVERGED, EXIT_OK
from estpipe.estimation.gmm import Reporter
from estpipe.estimation.optimizers import IterationRecord
from estpipe.text import count


class StderrReporter(Reporter):
    """Log lines and one line per accepted iteration on stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def log(self, message: str) -> None:
        print(f"estpipe: {message}", file=self.stream, flush=True)

    def iteration(self, r: IterationRecord) -> None:
        print(f"step {r.step} iter {r.iteration:3d}  Q = {r.objective:.10e}  |grad|inf = {r.grad_norm:.3e}  "
              f"|step| = {r.step_norm:.3e}  {r.seconds:7.2f} s  ({count(r.evaluations, 'evaluation')})",
              file=self.stream, flush=True)


def run_estimate(path: str | os.PathLike, options, stdout=None, stderr=None) -> int:
    """What `estpipe estimate` does: estimate, print a table (or JSON with options.json) on
    stdout, progress on stderr; returns the exit code (0 converged, 3 not converged).
    UserError propagates (the CLI prints it, exit code 2); when the results file could not be
    written, the results are printed first."""
    from estpipe.orchestration import estimate
    from estpipe.orchestration.estimate import ResultsNotWritten

    stdout = stdout or sys.stdout
    try:
        results = estimate(path, options, reporter=StderrReporter(stderr or sys.stderr))
    except ResultsNotWritten as exc:
        # the results first, where they cannot be lost; then the CLI prints the error line
        print(exc.results.to_json() if options.json else exc.results.table(), file=stdout, flush=True)
        raise
    print(results.to_json() if options.json else results.table(), file=stdout, flush=True)
    return EXIT_OK if results.converged else EXIT_NOT_CONVERGED
