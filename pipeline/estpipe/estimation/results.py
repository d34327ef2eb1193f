"""The results of an estimation: what was estimated is stored, what follows from it is derived.

Stored: the parameters, one covariance per standard-error type (`covariances`, the default named
by `se_type`), the final step's weight, the steps, the J test as one object, the objective and
log-likelihood, convergence. Derived as properties (linearmodels' results classes are the model):
standard errors, z, p-values, 95% intervals, the J test's three numbers. How the run went
(evaluations, seconds, workers, partitions, back end, versions, timings) is its own record,
`Telemetry`. `to_dict()` has every key of DESIGN.md's results file, with the same meaning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from estpipe.estimation.gmm import GmmEstimate, StepRecord
from estpipe.estimation.inference import JTest, z_table
from estpipe.estimation.mle import MleEstimate
from estpipe.estimation.weighting import WeightMatrix
from estpipe.errors import UserError
from estpipe.text import count

__all__ = ["Results", "StepRecord", "Telemetry"]


@dataclass
class Telemetry:
    """How a run went: evaluations (map/reduces of this run), evaluations_total (with those before
    a resume), wall_seconds, workers, partitions, backend (one line), versions, resumed (from
    which checkpoint, or None), timing (per-evaluation seconds and bytes, from the evaluator's
    stats), gradient_rule (how gradients were computed: reverse rule, forward projection, ...)."""

    evaluations: int
    evaluations_total: int
    wall_seconds: float
    workers: int
    partitions: int
    backend: str = ""
    versions: dict = field(default_factory=dict)
    resumed: dict | None = None
    timing: dict = field(default_factory=dict)
    gradient_rule: str = ""


@dataclass
class Results:
    """Estimates and inference (see DESIGN.md, "Results file", for every key's meaning).

    params: (P,); covariances: se type -> (P, P); truth: (P,) or None; config: every option of
    the run; data: the file's path, sizes and fingerprint."""

    params: np.ndarray
    param_names: list[str]
    covariances: dict[str, np.ndarray]
    se_type: str
    n_clusters: int | None
    weight: WeightMatrix | None
    j_test: JTest | None
    objective: float
    loglik: float | None
    converged: bool
    message: str
    steps: list[StepRecord]
    config: dict
    data: dict
    telemetry: Telemetry
    truth: np.ndarray | None = None
    derived: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    units: str = "sets"
    likelihood: dict | None = None  # MLE only: loglik_null, rho_squared(_adj), aic, bic, n_units
    moments: dict | None = None  # overidentified GMM: each moment's fit at the estimate (gmm.moment_fit)

    @classmethod
    def from_estimate(cls, est: GmmEstimate | MleEstimate, *, config: dict, data: dict, telemetry: Telemetry,
                      truth: np.ndarray | None = None) -> "Results":
        """est: a GmmEstimate, or an MleEstimate (estimation/mle.py: several covariances, and the
        likelihood's statistics)."""
        covariances = dict(getattr(est, "covariances", None) or {est.se_type: est.covariance})
        return cls(params=est.params, param_names=est.param_names, covariances=covariances,
                   se_type=est.se_type, n_clusters=est.n_clusters, weight=est.weight, j_test=est.j_test,
                   objective=est.objective, loglik=est.loglik, converged=est.converged, message=est.message,
                   steps=est.steps, config=config, data=data, telemetry=telemetry,
                   truth=truth if truth is not None and len(truth) == len(est.params) else None,
                   derived=list(est.derived), notes=list(est.notes), units=est.units,
                   likelihood=getattr(est, "likelihood", None), moments=getattr(est, "moment_fit", None))

    @property
    def estimator(self) -> str:
        return "gmm" if self.likelihood is None else "mle"

    def std_errors_of(self, se_type: str) -> np.ndarray:
        """Standard errors under `se_type` (a key of covariances)."""
        return np.sqrt(np.diag(self.covariances[se_type]))

    @property
    def robust_type(self) -> str | None:
        """The sandwich's name among the covariances: "robust" or "clustered"."""
        return next((k for k in self.covariances if k not in ("classical", "bhhh")), None)

    # -- derived --------------------------------------------------------------------------------------
    @property
    def covariance(self) -> np.ndarray:
        """The covariance of the estimates under the default standard errors (se_type)."""
        return self.covariances[self.se_type]

    @property
    def std_errors(self) -> np.ndarray:
        return np.sqrt(np.diag(self.covariance))

    def _z(self) -> dict[str, np.ndarray]:
        return z_table(self.params, self.std_errors)

    @property
    def z(self) -> np.ndarray:
        return self._z()["z"]

    @property
    def p_values(self) -> np.ndarray:
        return self._z()["p"]

    @property
    def ci95(self) -> tuple[np.ndarray, np.ndarray]:
        t = self._z()
        return t["lower"], t["upper"]

    @property
    def j_statistic(self) -> float | None:
        return None if self.j_test is None else self.j_test.statistic

    @property
    def j_df(self) -> int | None:
        return None if self.j_test is None else self.j_test.df

    @property
    def j_pvalue(self) -> float | None:
        return None if self.j_test is None else self.j_test.pvalue

    @property
    def evaluations(self) -> int:
        return self.telemetry.evaluations

    @property
    def wall_seconds(self) -> float:
        return self.telemetry.wall_seconds

    # -- output ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        zt = self._z()
        t = self.telemetry
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
            "evaluations": t.evaluations,
            "evaluations_total": t.evaluations_total,
            "wall_seconds": t.wall_seconds,
            "workers": t.workers,
            "partitions": t.partitions,
            "config": self.config,
            "data": self.data,
            "versions": t.versions,
            "z": zt["z"].tolist(),
            "p_values": zt["p"].tolist(),
            "ci95_lower": zt["lower"].tolist(),
            "ci95_upper": zt["upper"].tolist(),
            "truth": None if self.truth is None else self.truth.tolist(),
            "backend": t.backend,
            "resumed": t.resumed,
            "timing": t.timing,
            "gradient_rule": t.gradient_rule,
            "derived": [d.to_dict() for d in self.derived],
            "notes": list(self.notes),
            "units": self.units,
            "moments": self.moments,
        } | self.mle_dict()

    def mle_dict(self) -> dict:
        """The MLE's keys (DESIGN.md, "Maximum likelihood"); empty for GMM."""
        if self.likelihood is None:
            return {}
        L = self.likelihood
        return {"estimator": "mle", "loglik_null": L["loglik_null"], "rho_squared": L["rho_squared"],
                "rho_squared_adj": L["rho_squared_adj"], "aic": L["aic"], "bic": L["bic"], "n_units": L["n_units"],
                "n_draws": L.get("n_draws"), "draws_kind": L.get("draws_kind"),
                "std_errors_classical": self.std_errors_of("classical").tolist() if "classical" in self.covariances else None,
                "std_errors_robust": self.std_errors_of(self.robust_type).tolist() if self.robust_type else None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    # -- for notebooks (README, "From a notebook") ---------------------------------------------------
    def summary(self) -> str:
        """The table `estpipe estimate` prints."""
        return self.table()

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        """One line (a REPL's echo; the dataclass's own repr would print every array): what was
        estimated, whether it converged, where from, and how to see more."""
        names = ", ".join(self.param_names[:6]) + (", ..." if len(self.param_names) > 6 else "")
        method = "maximum likelihood" if self.likelihood is not None else f"GMM ({len(self.steps)} steps)"
        return (f"<estpipe Results: {method}, {count(len(self.params), 'parameter')} ({names}); "
                f"{'converged' if self.converged else 'NOT converged'}; {self.data.get('path', '')}; "
                "summary() or to_frame() for the estimates>")

    def to_frame(self):
        """A pandas DataFrame, one row per parameter (then per derived quantity, kind "derived"):
        estimate, std_error, z, p, ci_low, ci_high, truth (only when the data has it; NaN on
        the derived rows) and, for an MLE, std_error_classical and std_error_robust. Needs pandas (estpipe[notebook])."""
        try:
            import pandas as pd
        except ImportError:
            raise UserError('to_frame needs pandas: pip install "estpipe[notebook]"') from None
        zt = self._z()
        rows = {"kind": ["parameter"] * len(self.params), "estimate": self.params, "std_error": self.std_errors,
                "z": zt["z"], "p": zt["p"], "ci_low": zt["lower"], "ci_high": zt["upper"]}
        if self.truth is not None:  # only when the data has it (simulated data), as in the results file
            rows["truth"] = self.truth
        if self.likelihood is not None:
            if "classical" in self.covariances:
                rows["std_error_classical"] = self.std_errors_of("classical")
            if self.robust_type:
                rows["std_error_robust"] = self.std_errors_of(self.robust_type)
        frame = pd.DataFrame(rows, index=pd.Index(list(self.param_names), name="parameter"))
        if self.derived:
            lo, hi = self._derived_intervals()
            extra = pd.DataFrame(
                {"kind": "derived", "estimate": [d.estimate for d in self.derived],
                 "std_error": [d.std_error for d in self.derived], "z": [d.z for d in self.derived],
                 "p": [d.p_value for d in self.derived], "ci_low": lo, "ci_high": hi},
                index=pd.Index([d.name for d in self.derived], name="parameter"))
            if "truth" in rows:
                extra["truth"] = np.nan
            frame = pd.concat([frame, extra])
        return frame

    def _derived_intervals(self) -> tuple[np.ndarray, np.ndarray]:
        """The derived quantities' 95% intervals (lower, upper), as z_table makes the parameters'."""
        t = z_table(np.array([d.estimate for d in self.derived]), np.array([d.std_error for d in self.derived]))
        return t["lower"], t["upper"]

    def _repr_html_(self) -> str:
        """Jupyter's view: the estimates (then the derived quantities) as an HTML table under a
        one-line caption; every name is escaped."""
        import html

        zt = self._z()
        head = "".join(f"<th>{h}</th>" for h in ("", "estimate", "std. error", "z", "P&gt;|z|", "95% interval")
                       + (("truth",) if self.truth is not None else ()))
        body = []
        for k, name in enumerate(self.param_names):
            cells = [f"<th>{html.escape(str(name))}</th>", f"<td>{self.params[k]:.6g}</td>",
                     f"<td>{self.std_errors[k]:.4g}</td>", f"<td>{zt['z'][k]:.3f}</td>", f"<td>{zt['p'][k]:.4f}</td>",
                     f"<td>[{zt['lower'][k]:.5g}, {zt['upper'][k]:.5g}]</td>"]
            if self.truth is not None:
                cells.append(f"<td>{self.truth[k]:.5g}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        if self.derived:  # as the text table shows them: a block of their own (z against each one's null)
            body.append(f"<tr><th colspan=\"{6 + (self.truth is not None)}\">derived</th></tr>")
            for d, lo, hi in zip(self.derived, *self._derived_intervals()):
                body.append(f"<tr><th>{html.escape(str(d.name))}</th><td>{d.estimate:.6g}</td><td>{d.std_error:.4g}</td>"
                            f"<td>{d.z:.3f}</td><td>{d.p_value:.4f}</td><td>[{lo:.5g}, {hi:.5g}]</td>"
                            + ("<td></td>" if self.truth is not None else "") + "</tr>")
        status = "converged" if self.converged else "NOT converged"
        caption = html.escape(f"{'maximum likelihood' if self.likelihood is not None else 'GMM'}; {self.se_type} "
                              f"standard errors; {status}; {self.data.get('path', '')}")
        return (f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
                "</table>")

    def report(self, path):
        """Write the HTML report of these results to `path` (estpipe report; needs estpipe[report])."""
        try:  # imported here: the report (and its matplotlib) only when asked for
            from estpipe.report import write_report
        except ImportError as exc:
            if exc.name == "estpipe.report" or "estpipe.report" in str(exc):
                raise UserError("report: the report module (estpipe.report) is not available yet in this estpipe; "
                                "write the results with out=... and run `estpipe report` once it is") from None
            raise
        return write_report(self.to_dict(), path)

    def table(self) -> str:
        """A plain-text table: estimate, std. error, z, p, 95% interval (and the truth)."""
        zt = self._z()
        d = self.data
        steps = len(self.steps)
        mle = self.likelihood is not None
        method = ("maximum likelihood" if mle else
                  f"{'two-step' if steps == 2 else 'one-step'} GMM, W = {'S(b1)^-1' if steps == 2 else 'I'}")
        lines = [
            f"estpipe estimate: {d['path']}  ({count(d['n_sets'], 'set')}, {d['n_rows']} rows, K = {d['K']}, M = {d['M']})",
            f"{method}; "
            f"{self.se_type} standard errors" + (f" ({count(self.n_clusters, self.units.rstrip('s').replace('panel unit', 'decision maker'))})"
                                                 if self.n_clusters else "") + ("; classical beside them" if mle and "classical" in self.covariances else ""),
            "",
        ]
        w = max(9, *(len(n) for n in self.param_names))
        if mle:
            lines.pop()
            lines += ["", self._mle_rows(w)]
            return self._tail(lines + self._derived_rows(w))
        head = f"{'':<{w}} {'estimate':>11} {'std.err':>10} {'z':>8} {'P>|z|':>7} {'[95% interval]':>23}"
        if self.truth is not None:
            head += f" {'truth':>10}"
        lines.append(head)
        se = self.std_errors
        for k, name in enumerate(self.param_names):
            row = (f"{name:<{w}} {self.params[k]:>11.5g} {se[k]:>10.4g} {zt['z'][k]:>8.3f} "
                   f"{zt['p'][k]:>7.4f} {zt['lower'][k]:>11.5g} {zt['upper'][k]:>11.5g}")
            if self.truth is not None:
                row += f" {self.truth[k]:>10.5g}"
            lines.append(row)
        return self._tail(lines + self._derived_rows(w))

    def _derived_rows(self, w: int) -> list[str]:
        """The table of derived quantities (a nest's lambda, a lognormal's mean, ...), or none."""
        if not self.derived:
            return []
        lines = ["", f"{'derived':<{w}} {'estimate':>11} {'std.err':>10} {'z':>8} {'P>|z|':>7}  null"]
        for d in self.derived:
            lines.append(f"{d.name:<{w}} {d.estimate:>11.5g} {d.std_error:>10.4g} {d.z:>8.3f} {d.p_value:>7.4f}  {d.null:g}")
        return lines

    def _mle_rows(self, w: int) -> str:
        """The MLE's table: estimate, classical and robust (or clustered) standard errors, z, p
        and the 95% interval under the default (se_type)."""
        zt = self._z()
        # the columns: classical and robust (or clustered), and bhhh when it is the default; only
        # bhhh when no Hessian was made (--se bhhh)
        kinds = [k for k in ("classical", self.robust_type) if k in self.covariances]
        if self.se_type == "bhhh":
            kinds.append("bhhh")
        head = (f"{'':<{w}} {'estimate':>11} " + " ".join(f"{k:>10}" for k in kinds) + f" {'z':>8} {'P>|z|':>7} "
                f"{'[95% interval]':>23}" + (f" {'truth':>10}" if self.truth is not None else ""))
        rows = [head]
        ses = [self.std_errors_of(k) for k in kinds]
        for k, name in enumerate(self.param_names):
            row = (f"{name:<{w}} {self.params[k]:>11.5g} " + " ".join(f"{se[k]:>10.4g}" for se in ses) +
                   f" {zt['z'][k]:>8.3f} {zt['p'][k]:>7.4f} {zt['lower'][k]:>11.5g} {zt['upper'][k]:>11.5g}")
            if self.truth is not None:
                row += f" {self.truth[k]:>10.5g}"
            rows.append(row)
        return "\n".join(rows)

    def _tail(self, lines: list[str]) -> str:
        lines += [f"note: {n}" for n in self.notes]
        lines.append("")
        if self.likelihood is not None:
            L = self.likelihood
            lines.append(f"loglik = {self.loglik:.6g}; null (equal probabilities) {L['loglik_null']:.6g}; rho^2 = "
                         f"{L['rho_squared']:.4f} (adjusted {L['rho_squared_adj']:.4f}); AIC {L['aic']:.6g}, "
                         f"BIC {L['bic']:.6g} (n = {count(L['n_units'], 'unit')})")
            return self._last_line(lines)
        tail = f"objective Q = {self.objective:.6g}"
        if self.j_test is not None:
            tail += f"; J = {self.j_statistic:.4g} (df {self.j_df}, p = {self.j_pvalue:.4g})"
        if self.loglik is not None and math.isfinite(self.loglik):
            tail += f"; loglik = {self.loglik:.6g}"
        lines.append(tail)
        return self._last_line(lines)

    def _last_line(self, lines: list[str]) -> str:
        lines.append(
            f"{'converged' if self.converged else 'NOT converged'}: {self.message.rstrip('.')}; "
            f"{count(self.evaluations, 'evaluation')}, {self.wall_seconds:.2f} s, {self.telemetry.backend}"
        )
        return "\n".join(lines)
