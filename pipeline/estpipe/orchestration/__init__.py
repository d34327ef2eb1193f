"""Running an estimation: read the data's facts, start the back end, checkpoint, results file.

    estimate(path, options) -> Results
"""

from estpipe.estimation.gmm import Reporter
from estpipe.orchestration.estimate import estimate
from estpipe.orchestration.options import EstimateOptions

__all__ = ["EstimateOptions", "Reporter", "estimate"]
