"""The estimators (`estimator=`): two-step GMM (estimation/gmm.py, the default) and maximum
likelihood (estimation/mle.py; simulated, per decision maker, for mixed logit)."""

from __future__ import annotations

from estpipe.registry import Choice, Registry

ESTIMATORS: Registry[Choice] = Registry("estimator", [
    Choice("gmm", "two-step GMM on the file's moments, the default"),
    Choice("mle", "maximum likelihood of the chosen rows (simulated, per decision maker, for mixed-logit)"),
])
