"""Which instruments identify the nested logit's lambdas: asymptotic standard errors at the truth.

For the data of `estpipe simulate --design nested-logit` (6,000 sets of 4-7 of 7 alternatives in
3 nests, K = 3), the GMM standard errors of (b, log lambda) with W = S^-1,
    V = (G' S^-1 G)^-1 / n,  G = d mean(h) / d theta (central differences),  S = mean(h h'),
for several instrument sets, all evaluated at the stored truth (no estimation, so no start or
convergence question). Run: PYTHONPATH=pipeline python3 scripts/nested_instruments.py [--seed 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from estpipe.data.format import ChoiceDataFile
from estpipe.data.simulate import simulate_choice_data
from estpipe.data.simulate_models import nest_sizes, nested_logit_log_probabilities


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--sets", type=int, default=6000)
    ap.add_argument("--alternatives", default="4:7")
    args = ap.parse_args()
    lo, hi = (int(a) for a in args.alternatives.split(":"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "n.h5"
        simulate_choice_data(path, design="nested-logit", sets=args.sets, alternatives=(lo, hi), params=3, moments=6,
                             nests=3, seed=args.seed)
        with ChoiceDataFile(path) as f:
            d, truth = f.read_sets(), f.truth
    X, sizes = d.X, np.diff(d.offsets)
    nest = np.repeat(np.arange(3), nest_sizes(hi, 3))[d.alt]
    n, set_of_row = len(sizes), np.repeat(np.arange(len(sizes)), sizes)
    _, group, count = np.unique(set_of_row * 3 + nest, return_inverse=True, return_counts=True)
    chosen = d.chosen == 1

    def within(k):
        return X[:, k] - np.bincount(group, weights=X[:, k])[group] / count[group]

    sets = {
        "x": [X[:, k] for k in range(3)],
        "x, x d_n (last n left out)": [X[:, k] for k in range(3)] + [X[:, k] * (nest == m) for k in range(3) for m in range(2)],
        "x, within-nest x d_n": [X[:, k] for k in range(3)] + [within(k) * (nest == m) for k in range(3) for m in range(3)],
        "x, within-nest x1 d_n only": [X[:, k] for k in range(3)] + [within(0) * (nest == m) for m in range(3)],
    }

    def h(theta, Z):
        p = np.exp(nested_logit_log_probabilities(X @ theta[:3], nest, np.exp(theta[3:]), sizes))
        dm = Z - np.repeat(Z[chosen], sizes, axis=0)
        out = np.zeros((n, Z.shape[1]))
        np.add.at(out, set_of_row, p[:, None] * dm)
        return out

    print(f"truth lambda = {np.round(np.exp(truth[3:]), 3)}, {n} sets of {lo}-{hi} alternatives, seed {args.seed}")
    print(f"{'instruments':<30} {'M':>3}  se(log lambda_n1, n2, n3)")
    for label, columns in sets.items():
        Z = np.column_stack(columns)
        if Z.shape[1] < 6:
            print(f"{label:<30} {Z.shape[1]:>3}  not identified (M < P = 6)")
            continue
        H = h(truth, Z)
        S = H.T @ H / n
        G = np.column_stack([(h(truth + e, Z).mean(0) - h(truth - e, Z).mean(0)) / 2e-6 for e in np.eye(6) * 1e-6])
        V = np.linalg.inv(G.T @ np.linalg.solve(S, G)) / n
        print(f"{label:<30} {Z.shape[1]:>3}  {np.round(np.sqrt(np.diag(V))[3:], 3)}")


if __name__ == "__main__":
    main()
