"""The facts of a choice-data file, read once into one value that travels.

A `ChoiceProblem` holds what every layer above the file needs to know about the data without its
rows: the path, the sizes, the names, the set offsets and cluster ids (8 bytes per set each), the
true parameters of a simulation and the fingerprint. It is read once (`read_problem`) and passed
whole, instead of K, M, has_chosen, has_cluster and the fingerprint one by one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True, eq=False)
class ChoiceProblem:
    """path: the file (absolute); n_sets, n_rows, K (covariates), M (moments); x_names (K,),
    moment_names (M,); offsets: (n_sets + 1,) int64; cluster: (n_sets,) int64 or None;
    has_chosen; truth: (P,) or None, the true parameters of a simulation named by truth_names (P,);
    fingerprint; provenance (dict); alt_names: the alternatives' names when the file has
    alternative ids; panel: (n_sets,) int64 panel unit per set or None; nests: the nests text of
    a nested-logit simulation or None."""

    path: Path
    n_sets: int
    n_rows: int
    K: int
    M: int
    x_names: list[str]
    moment_names: list[str]
    offsets: np.ndarray
    cluster: np.ndarray | None
    has_chosen: bool
    truth: np.ndarray | None
    fingerprint: str
    provenance: dict = field(default_factory=dict)
    alt_names: list[str] | None = None
    panel: np.ndarray | None = None
    truth_names: list[str] | None = None
    nests: str | None = None

    @property
    def has_panel(self) -> bool:
        return self.panel is not None

    @property
    def has_cluster(self) -> bool:
        return self.cluster is not None

    @property
    def n_clusters(self) -> int | None:
        return None if self.cluster is None else int(len(np.unique(self.cluster)))

    def truth_for(self, param_names: list[str]) -> np.ndarray | None:
        """The true parameters in the order of `param_names` when the file has a truth for every
        one of them (by name), else None."""
        if self.truth is None or self.truth_names is None:
            return None
        known = dict(zip(self.truth_names, self.truth))
        if not all(n in known for n in param_names):
            return None
        return np.array([known[n] for n in param_names], dtype=np.float64)

    def summary(self) -> dict:
        """path, sizes and fingerprint: the results file's `data` record."""
        sizes, counts = np.unique(np.diff(self.offsets), return_counts=True)
        out = {"path": str(self.path), "n_sets": self.n_sets, "n_rows": self.n_rows, "K": self.K, "M": self.M,
               "fingerprint": self.fingerprint,
               "set_sizes": {str(int(j)): int(c) for j, c in zip(sizes, counts)},  # alternatives -> sets
               "n_clusters": None if self.cluster is None else int(len(np.unique(self.cluster))),
               "n_panel_units": None if self.panel is None else int(len(np.unique(self.panel))),
               "has_chosen": bool(self.has_chosen)}
        origin = self.provenance or {}
        out["provenance"] = {k: origin[k] for k in ("command", "time", "estpipe_version", "input", "design", "seed")
                             if k in origin}
        return out


def read_problem(path: str | os.PathLike) -> ChoiceProblem:
    """The facts of the choice-data file at `path` (checked as ChoiceDataFile checks them)."""
    from estpipe.data.format import ChoiceDataFile

    with ChoiceDataFile(path) as f:
        return ChoiceProblem(
            path=Path(path).resolve(), n_sets=f.n_sets, n_rows=f.n_rows, K=f.K, M=f.M,
            x_names=list(f.param_names), moment_names=list(f.moment_names), offsets=f.offsets,
            cluster=f.read_cluster(), has_chosen=f.has_chosen, truth=f.truth, fingerprint=f.fingerprint(),
            provenance=dict(f.provenance), alt_names=f.alt_names, panel=f.read_panel(),
            truth_names=f.truth_names, nests=f.nests,
        )
