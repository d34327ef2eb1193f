"""The estimators, pure: objective, optimizers, weighting, inference, units, results (DESIGN.md,
"GMM, step by step" and "Units"). Nothing here starts a back end, writes a file or knows a flag."""
