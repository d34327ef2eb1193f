"""GMM estimation and inference: weighting, the optimizer loop, standard errors, the J test,
checkpoints and results (DESIGN.md, "GMM, step by step")."""

from estpipe.gmm.estimate import Reporter, StderrReporter, estimate, run_estimate
from estpipe.gmm.inference import JTest, check_identification, covariance_of_estimates, j_test
from estpipe.gmm.optimize import IterationRecord, MomentOracle, OptimizeResult, run_optimizer
from estpipe.gmm.options import DERIVATIVES, OPTIMIZERS, EstimateOptions
from estpipe.gmm.results import Results, StepRecord
from estpipe.gmm.weighting import WeightMatrix

__all__ = [
    "DERIVATIVES", "OPTIMIZERS", "EstimateOptions", "IterationRecord", "JTest", "MomentOracle", "OptimizeResult",
    "Reporter", "Results", "StderrReporter", "StepRecord", "WeightMatrix", "check_identification",
    "covariance_of_estimates", "estimate", "j_test", "run_estimate", "run_optimizer",
]
