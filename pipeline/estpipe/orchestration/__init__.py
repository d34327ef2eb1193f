"""Running an estimation: read the data's facts, start the back end, checkpoint, results file.

    estimate(path, options) -> Results        run_estimate(path, options) -> exit code
"""

from estpipe.orchestration.estimate import Reporter, StderrReporter, estimate, run_estimate
from estpipe.orchestration.options import EstimateOptions

__all__ = ["EstimateOptions", "Reporter", "StderrReporter", "estimate", "run_estimate"]
