"""The results of `estpipe estimate`: one dataclass whose `to_dict()` has every key of DESIGN.md
("Results file"), a table for people and JSON for scripts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from estpipe.orchestration.checkpoint import write_json_atomic
from estpipe.estimation.inference import z_table
from estpipe.text import count


@dataclass
class StepRecord:
    """One GMM step: its weighting, estimate, objective, and how the optimizer ended."""

    step: int
    weighting: str
    params: list[float]
    objective: float
    iterations: int
    evaluations: int
    converged: bool
    message: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Results:
    """Estimates and inference (see DESIGN.md, "Results file", for every key's meaning).

    params, std_errors: (P,); covariance: (P, P); truth: (P,) or None."""

    params: np.ndarray
    param_names: list[str]
    std_errors: np.ndarray
    se_type: str
    covariance: np.ndarray
    n_clusters: int | None
    objective: float
    j_statistic: float | None
    j_df: int | None
    j_pvalue: float | None
    loglik: float | None
    converged: bool
    message: str
    steps: list[StepRecord]
    evaluations: int  # of this run
    evaluations_total: int  # with those before a resume (from the checkpoint)
    wall_seconds: float
    workers: int
    partitions: int
    config: dict
    data: dict
    versions: dict
    truth: np.ndarray | None = None
    backend: str = ""
    resumed: dict | None = None
    timing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        zt = z_table(self.params, self.std_errors)
        return {
            "params": self.params.tolist(),
            "param_names": list(self.param_names),
            "std_errors": self.std_errors.tolist(),
            "se_type": self.se_type,
            "covariance": self.covariance.tolist(),
            "n_clusters": self.n_clusters,
            "objective": self.objective,
            "j_statistic": self.j_statistic,
            "j_df": self.j_df,
            "j_pvalue": self.j_pvalue,
            "loglik": self.loglik,
            "converged": self.converged,
            "message": self.message,
            "steps": [s.to_dict() for s in self.steps],
            "evaluations": self.evaluations,
            "evaluations_total": self.evaluations_total,
            "wall_seconds": self.wall_seconds,
            "workers": self.workers,
            "partitions": self.partitions,
            "config": self.config,
            "data": self.data,
            "versions": self.versions,
            "z": zt["z"].tolist(),
            "p_values": zt["p"].tolist(),
            "ci95_lower": zt["lower"].tolist(),
            "ci95_upper": zt["upper"].tolist(),
            "truth": None if self.truth is None else self.truth.tolist(),
            "backend": self.backend,
            "resumed": self.resumed,
            "timing": self.timing,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    def table(self) -> str:
        """A plain-text table: estimate, std. error, z, p, 95% interval (and the truth)."""
        zt = z_table(self.params, self.std_errors)
        d = self.data
        steps = len(self.steps)
        lines = [
            f"estpipe estimate: {d['path']}  ({count(d['n_sets'], 'set')}, {d['n_rows']} rows, K = {d['K']}, M = {d['M']})",
            f"{'two-step' if steps == 2 else 'one-step'} GMM, W = {'S(b1)^-1' if steps == 2 else 'I'}; "
            f"{self.se_type} standard errors" + (f" ({count(self.n_clusters, 'cluster')})" if self.n_clusters else ""),
            "",
        ]
        w = max(9, *(len(n) for n in self.param_names))
        head = f"{'':<{w}} {'estimate':>11} {'std.err':>10} {'z':>8} {'P>|z|':>7} {'[95% interval]':>23}"
        if self.truth is not None:
            head += f" {'truth':>10}"
        lines.append(head)
        for k, name in enumerate(self.param_names):
            row = (f"{name:<{w}} {self.params[k]:>11.5g} {self.std_errors[k]:>10.4g} {zt['z'][k]:>8.3f} "
                   f"{zt['p'][k]:>7.4f} {zt['lower'][k]:>11.5g} {zt['upper'][k]:>11.5g}")
            if self.truth is not None:
                row += f" {self.truth[k]:>10.5g}"
            lines.append(row)
        lines.append("")
        tail = f"objective Q = {self.objective:.6g}"
        if self.j_statistic is not None:
            tail += f"; J = {self.j_statistic:.4g} (df {self.j_df}, p = {self.j_pvalue:.4g})"
        if self.loglik is not None and math.isfinite(self.loglik):
            tail += f"; loglik = {self.loglik:.6g}"
        lines.append(tail)
        lines.append(
            f"{'converged' if self.converged else 'NOT converged'}: {self.message}; {count(self.evaluations, 'evaluation')}, "
            f"{self.wall_seconds:.2f} s, {self.backend}"
        )
        return "\n".join(lines)
