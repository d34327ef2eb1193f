"""The HTML report of a results file (`estpipe report RESULTS.json`, `estimate --report`,
`Results.report(path)`; DESIGN.md, "Report").

    write_report(results: dict, path) -> Path

One self-contained HTML file (plots as embedded PNG, no script, no external URL: it opens from a
cluster's shared disk), drawn from the results dictionary alone, section by section:

1. status and estimates: a banner when the run did not converge, the estimates table;
2. estimates: each estimate with its 95% interval on its own axis (parameters' scales differ), the
   truth marked when the data has it; and then the standardized errors (b - truth) / se of all
   parameters on one axis against the +-1.96 band;
3. convergence: objective and gradient norm against iteration (log scales) per step, with the
   evaluations and seconds of each iteration (steps[].history; older files omit the section);
4. moment conditions (overidentified GMM): each g_m / se(g_m) against +-1.96, and the J test;
5. likelihood (MLE): loglik, null loglik, rho-squared, AIC, BIC;
6. data (sizes, a histogram of set sizes, clusters, panel units) and run (back end, workers,
   partitions, time per evaluation, versions, provenance).

matplotlib (the `report` extra) draws the plots with the Agg back end; every key beyond the
core ones (params, param_names, std_errors) is optional, so an older results file renders.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

from estpipe.errors import UserError
from estpipe.outputs import write_bytes_atomic

# Unique colours, each used by one kind of mark only, so that a test (or a reader) finds each
# mark by its colour, in the PNG or in a browser's screenshot of the page.
ESTIMATE_COLOR = "#d6246e"  # the estimates' markers
INTERVAL_COLOR = "#4a6fa5"  # their 95% intervals
TRUTH_COLOR = "#1a9850"  # the truth
ZERR_COLOR = "#7b3294"  # standardized errors
FIT_COLOR = "#e08214"  # moment conditions' t
OBJECTIVE_COLOR = "#2c7fb8"  # convergence: the objective
GRADIENT_COLOR = "#8c510a"  # convergence: the gradient norm
SIZES_COLOR = "#737373"  # the histogram of set sizes
Z95 = 1.959963984540054


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError('the report needs matplotlib, which the core install does not include: '
                        'pip install "estpipe[report]"') from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _img(data: str, alt: str, cls: str) -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v, fmt=".6g") -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float) and not math.isfinite(v):
        return html.escape(str(v))
    return format(v, fmt) if isinstance(v, (int, float)) else html.escape(str(v))


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _kv(pairs: list[tuple[str, object]]) -> str:
    return "<table class=\"kv\"><tbody>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v if isinstance(v, str) and v.startswith('<') else _num(v)}</td></tr>"
        for k, v in pairs) + "</tbody></table>"


# -- sections -------------------------------------------------------------------------------------
def _estimates_table(r: dict) -> str:
    names, b, se = r["param_names"], r["params"], r["std_errors"]
    z = r.get("z") or [bi / si if si else None for bi, si in zip(b, se)]
    p = r.get("p_values") or [None] * len(b)
    lo = r.get("ci95_lower") or [bi - Z95 * si for bi, si in zip(b, se)]
    hi = r.get("ci95_upper") or [bi + Z95 * si for bi, si in zip(b, se)]
    truth = r.get("truth")
    mle = r.get("estimator") == "mle" and r.get("std_errors_classical") is not None
    head = ["parameter", "estimate", f"std. error ({r.get('se_type', '')})"]
    if mle:
        head += ["classical", "robust"]
    head += ["z", "P>|z|", "95% interval"] + (["truth"] if truth else [])
    rows = []
    for k, name in enumerate(names):
        row = [html.escape(name), _num(b[k]), _num(se[k], ".4g")]
        if mle:
            row += [_num(r["std_errors_classical"][k], ".4g"), _num(r["std_errors_robust"][k], ".4g")]
        row += [_num(z[k], ".3f"), _num(p[k], ".4f"), f"[{_num(lo[k], '.5g')}, {_num(hi[k], '.5g')}]"]
        if truth:
            row.append(_num(truth[k], ".5g"))
        rows.append(row)
    out = _table(head, rows, "estimates")
    derived = r.get("derived") or []
    if derived:
        out += "<h3>Derived quantities (delta method)</h3>" + _table(
            ["quantity", "estimate", "std. error", "z", "P>|z|", "null"],
            [[html.escape(d["name"]), _num(d["estimate"]), _num(d["std_error"], ".4g"), _num(d["z"], ".3f"),
              _num(d["p_value"], ".4f"), _num(d["null"])] for d in derived])
    notes = r.get("notes") or []
    if notes:
        out += "<ul class=\"notes\">" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
    return out


def _estimates_plot(r: dict, plt) -> str:
    """Each estimate on its own scale (parameters' scales differ: on one shared axis most
    intervals would be dots), all in ONE axes: row k maps its own span (interval, truth, and
    zero when near) onto [0, 1] and prints its numbers beside it. One axes, not P, keeps a
    20-parameter plot at ~0.1 s."""
    names, b, se = r["param_names"], r["params"], r["std_errors"]
    truth = r.get("truth")
    P = len(names)
    fig, ax = plt.subplots(figsize=(8.4, 0.3 * P + 0.8))
    ys = list(range(P))[::-1]
    seg_x, seg_y, dots, ticks, zeros, labels = [], [], [], [], [], []
    for k, y in enumerate(ys):
        has_ci = _finite(se[k])  # a standard error that is null or NaN (a flat direction): the point alone
        lo, hi = (b[k] - Z95 * se[k], b[k] + Z95 * se[k]) if has_ci else (b[k], b[k])
        t = truth[k] if truth is not None and _finite(truth[k]) else None
        span = [lo, hi] + ([t] if t is not None else [])
        width = (max(span) - min(span)) or max(abs(b[k]), 1.0)
        if min(span) - 0.5 * width <= 0.0 <= max(span) + 0.5 * width:
            span.append(0.0)  # zero within reach: on the row, so a reader sees whether the interval covers it
        left, right = min(span), max(span)
        width = (right - left) or max(abs(b[k]), 1.0)
        left, right = left - 0.06 * width, right + 0.06 * width

        def u(v, left=left, right=right):
            return (v - left) / (right - left)

        if has_ci:
            seg_x += [u(lo), u(hi), None]
            seg_y += [y, y, None]
        dots.append((u(b[k]), y))
        if t is not None:
            ticks.append((u(t), y))
        if left <= 0.0 <= right:
            zeros.append((u(0.0), y))
        text = f"{b[k]:.4g}" + (f"  [{lo:.4g}, {hi:.4g}]" if has_ci else "  (no std. error)")
        labels.append((y, text + (f"   truth {t:.4g}" if t is not None else "")))
    if zeros:
        ax.plot([x for x, _ in zeros], [y for _, y in zeros], "|", color="#aaaaaa", ms=12, mew=1, zorder=1)
    ax.plot([v if v is not None else float("nan") for v in seg_x], [v if v is not None else float("nan") for v in seg_y],
            "-", color=INTERVAL_COLOR, lw=2, zorder=2)
    if ticks:
        ax.plot([x for x, _ in ticks], [y for _, y in ticks], "|", color=TRUTH_COLOR, ms=14, mew=2.5, zorder=2)
    ax.plot([x for x, _ in dots], [y for _, y in dots], "o", color=ESTIMATE_COLOR, ms=7, mew=0, zorder=3)
    for y, text in labels:
        ax.text(1.03, y, text, va="center", ha="left", fontsize=8, family="monospace")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.7, P - 0.3)
    ax.set_xticks([])
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    for side in ("right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    fig.text(0.01, 1 - 0.12 / fig.get_figheight(), "estimate (dot), 95% interval (line)"
             + (", truth (green tick)" if truth else "") + ", zero (grey tick); each row on its own scale",
             fontsize=8, va="top", ha="left")
    fig.subplots_adjust(left=0.13, right=0.5, top=1 - 0.35 / fig.get_figheight(), bottom=0.15 / fig.get_figheight())
    return _png(fig, plt)


def _standardized_plot(r: dict, plt) -> str:
    names, b, se, truth = r["param_names"], r["params"], r["std_errors"], r["truth"]
    keep = [k for k in range(len(names)) if _finite(se[k]) and se[k] > 0]  # a z needs a standard error
    names = [names[k] for k in keep]
    z = [(b[k] - truth[k]) / se[k] for k in keep]
    P = len(names)
    fig, ax = plt.subplots(figsize=(7.5, 0.28 * P + 1.2))
    ys = list(range(P))[::-1]
    ax.axvspan(-Z95, Z95, color="#dddddd", zorder=0)
    ax.axvline(0, color="#888888", lw=1)
    ax.plot(z, ys, "D", color=ZERR_COLOR, ms=6, zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    lim = max(3.0, max(abs(v) for v in z) * 1.15)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("(estimate - truth) / std. error; the truth at 0, grey: +-1.96", fontsize=9)
    fig.subplots_adjust(left=0.22, right=0.97, top=1 - 0.15 / fig.get_figheight(), bottom=0.55 / fig.get_figheight())
    return _png(fig, plt)


def _per_iteration(h: list[dict]) -> list[tuple]:
    """(evaluations, seconds) of each iteration from the history's running counts, which restart
    where a resumed run began (a count that falls): there the iteration's own is the count."""
    out, prev_e, prev_t = [], 0, 0.0
    for e in h:
        ev, secs = e.get("evaluations"), e.get("seconds")
        d_e = None if ev is None else (ev - prev_e if ev >= prev_e else ev)
        d_t = None if secs is None else (secs - prev_t if secs >= prev_t else secs)
        out.append((d_e, d_t))
        prev_e, prev_t = (ev if ev is not None else prev_e), (secs if secs is not None else prev_t)
    return out


def _path(ax, x, y, color) -> None:
    """One marker per iteration in `color` on a thin grey line (the markers stay separate blobs
    of their colour, so a test counts the iterations drawn)."""
    ax.plot(x, y, "-", color="#bbbbbb", lw=1, zorder=2)
    ax.plot(x, y, "o", color=color, ms=4.5, mew=0, zorder=3)


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_of_ten(value: float, _pos=None) -> str:
    """A log axis' tick label as plain text, 10 with a Unicode superscript (10⁻³): matplotlib's own
    labels are mathtext, whose parser costs 0.2-0.4 s of the first report a process draws."""
    if not (value > 0 and math.isfinite(value)):
        return ""
    e = round(math.log10(value))
    if abs(value - 10.0 ** e) <= 1e-9 * value:
        return "1" if e == 0 else ("10" if e == 1 else "10" + str(e).translate(_SUPERSCRIPT))
    return f"{value:.3g}"


def _log_axis(ax, plt) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(_power_of_ten))


def _convergence(r: dict, plt) -> str:
    steps = [s for s in (r.get("steps") or []) if s.get("history")]
    if not steps:
        return ""
    fig, axes = plt.subplots(len(steps), 2, figsize=(8.4, 2.4 * len(steps) + 0.4), squeeze=False)
    tables = []
    for i, s in enumerate(steps):
        h = s["history"]
        it = [e["iteration"] for e in h]
        obj = [e.get("objective") for e in h]
        grad = [e.get("gradient_norm") for e in h]
        label = f"step {s.get('step', i + 1)} ({s.get('weighting', '')})"
        # an MLE's optimizer is followed by BHHH polish steps: a dashed line where they begin
        polish = next((e["iteration"] for e in h if e.get("phase") == "polish"), None)
        ax = axes[i, 0]
        pts = [(x, o) for x, o in zip(it, obj) if _finite(o)]
        _path(ax, [x for x, _ in pts], [o for _, o in pts], OBJECTIVE_COLOR)
        positive = [o for _, o in pts if o > 0]
        if positive and len(positive) == len(pts):
            _log_axis(ax, plt)
            ax.yaxis.set_minor_formatter(plt.NullFormatter())  # a narrow range labels its minor ticks: unreadable
            if max(positive) / min(positive) < 10:
                ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%.6g"))
                ax.yaxis.set_minor_locator(plt.NullLocator())
                ax.set_yticks(sorted({min(positive), max(positive)}))
        ax.set_title(f"{label}: objective" + (" (-loglik)" if s.get("weighting") == "mle" else ""), fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax = axes[i, 1]
        pts = [(x, v) for x, v in zip(it, grad) if _finite(v) and v > 0]
        _path(ax, [x for x, _ in pts], [v for _, v in pts], GRADIENT_COLOR)
        if pts:
            _log_axis(ax, plt)
        ax.set_title(f"{label}: gradient norm", fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        for ax in axes[i]:
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            if polish is not None:
                ax.axvline(polish - 0.5, color="#999999", ls="--", lw=1)
        per = _per_iteration(h)
        rows = [[e["iteration"], html.escape(str(e.get("phase", ""))), _num(e.get("objective"), ".10g"),
                 _num(e.get("gradient_norm"), ".3e"), _num(d_e), _num(d_t, ".3f")] for e, (d_e, d_t) in zip(h, per)]
        evals = [d for d, _ in per if d is not None]
        secs = [t for _, t in per if t is not None]
        mean = []
        if evals:
            v = sum(evals) / len(evals)
            mean.append(f"{v:.3g} evaluation{'' if v == 1 else 's'}")
        if secs:
            mean.append(f"{sum(secs) / len(secs):.3g} s")
        summary = (f"{html.escape(label)}: {len(h)} iterations" + (f" ({polish - 1} by the optimizer, then BHHH polish)"
                                                                 if polish is not None else "")
                   + (f", {' and '.join(mean)} per iteration" if mean else "")
                   + f"; {_num(s.get('evaluations'))} evaluations in all; {html.escape(str(s.get('message', '')))}")
        head = ["iteration", "phase", "objective", "gradient norm", "evaluations", "seconds"]
        if not any(e.get("phase") for e in h):
            head.pop(1)
            rows = [r[:1] + r[2:] for r in rows]
        tables.append(f"<details><summary>{summary}</summary>" + _table(head, rows) + "</details>")
    fig.subplots_adjust(left=0.13, right=0.97, top=1 - 0.35 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        hspace=0.75, wspace=0.3)
    return (_img(_png(fig, plt), "convergence of each step", "convergence")
            + "<p class=\"small\">Log scales. The gradient norm is the largest absolute component of the "
              "objective's gradient in standardized parameters (GMM: of the normalized Q; MLE: of the mean score), "
              "the quantity the convergence test compares with --tol. Each step's table gives the evaluations and "
              "seconds of every iteration.</p>" + "".join(tables))


def _moments(r: dict, plt) -> str:
    m = r.get("moments")
    if not m:
        return ""
    names, t = m["names"], m["t"]
    fig, ax = plt.subplots(figsize=(7.5, 0.26 * len(names) + 1.2))
    ys = list(range(len(names)))[::-1]
    ax.axvspan(-Z95, Z95, color="#dddddd", zorder=0)
    ax.axvline(0, color="#888888", lw=1)
    ax.barh(ys, [v if v is not None else 0.0 for v in t], color=FIT_COLOR, height=0.6, zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    lim = max(3.0, max((abs(v) for v in t if v is not None), default=0.0) * 1.15)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("g_m / std. error of g_m at the estimate; grey: +-1.96", fontsize=9)
    fig.subplots_adjust(left=0.22, right=0.97, top=1 - 0.15 / fig.get_figheight(), bottom=0.55 / fig.get_figheight())
    out = _img(_png(fig, plt), "moment conditions' fit", "moments")
    j = r.get("j_statistic")
    if j is not None:
        out += (f"<p>Hansen's J = {_num(j, '.4g')} with {_num(r.get('j_df'))} degrees of freedom, p = "
                f"{_num(r.get('j_pvalue'), '.4g')}: {'no evidence against' if (r.get('j_pvalue') or 0) > 0.05 else 'evidence against'} "
                "the overidentifying restrictions at 5%.</p>")
    out += ("<p class=\"small\">Var(sqrt(n) g) = (I - G(G'WG)<sup>-1</sup>G'W) S (I - G(G'WG)<sup>-1</sup>G'W)'; "
            "for the efficient W = S<sup>-1</sup> this is S - G(G'S<sup>-1</sup>G)<sup>-1</sup>G', of rank M - K "
            "(Hansen 1982). A moment far outside the band is one the model does not fit.</p>")
    out += _table(["moment", "g", "std. error", "t"],
                  [[html.escape(n), _num(g, ".4g"), _num(s, ".4g"), _num(tv, ".3f")]
                   for n, g, s, tv in zip(names, m["g"], m["std_errors"], t)])
    return out


def _likelihood(r: dict) -> str:
    if r.get("estimator") != "mle":
        return ""
    pairs = [("log-likelihood", r.get("loglik")), ("null log-likelihood (equal probabilities)", r.get("loglik_null")),
             ("rho-squared", r.get("rho_squared")), ("adjusted rho-squared", r.get("rho_squared_adj")),
             ("AIC", r.get("aic")), ("BIC", r.get("bic")), ("units (n of BIC)", r.get("n_units"))]
    if r.get("n_draws"):
        pairs += [("draws per decision maker", r.get("n_draws")), ("draws", r.get("draws_kind"))]
    return _kv(pairs)


def _histogram(sizes: dict, plt) -> str:
    xs = sorted(int(k) for k in sizes)
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.bar(xs, [sizes[str(x)] for x in xs], color=SIZES_COLOR, width=0.8)
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("alternatives in the set", fontsize=9)
    ax.set_ylabel("sets", fontsize=9)
    fig.subplots_adjust(left=0.14, right=0.97, top=0.93, bottom=0.25)
    return _img(_png(fig, plt), "histogram of set sizes", "sizes")


def _data_and_run(r: dict, plt) -> str:
    d = r.get("data") or {}
    pairs = [("file", d.get("path")), ("sets", d.get("n_sets")), ("rows", d.get("n_rows")), ("K (covariates)", d.get("K")),
             ("M (moments)", d.get("M")), ("fingerprint", d.get("fingerprint"))]
    pairs = [p for p in pairs if p[1] is not None]
    for name, key in (("clusters", "n_clusters"), ("panel units", "n_panel_units")):
        if key in d:  # null: the file has none (older results files lack the key: nothing said)
            pairs.append((name, "none" if d[key] is None else d[key]))
    sizes = d.get("set_sizes") or {}
    if sizes:
        js = [int(k) for k in sizes]
        pairs.append(("alternatives per set", f"{min(js)}" if min(js) == max(js) else f"{min(js)} to {max(js)}"))
    out = "<h3>Data</h3>" + _kv(pairs)
    if d.get("set_sizes"):
        out += _histogram(d["set_sizes"], plt)
    prov = d.get("provenance") or {}
    if prov:
        out += "<h4>Provenance of the data</h4>" + _kv([(k, str(v)) for k, v in prov.items()])
    t = r.get("timing") or {}
    per = t.get("evaluation_seconds")
    ev = r.get("evaluations")
    run = [("back end", r.get("backend")), ("workers", r.get("workers")), ("partitions", r.get("partitions")),
           ("estimator", r.get("estimator", "gmm")), ("model", (r.get("config") or {}).get("model")),
           ("optimizer", (r.get("config") or {}).get("optimizer")), ("evaluations", ev),
           ("seconds per evaluation", None if not (per and ev) else f"{per / ev:.4g}"),
           ("wall seconds", r.get("wall_seconds")), ("gradient rule", r.get("gradient_rule")),
           ("resumed", None if not r.get("resumed") else str(r["resumed"]))]
    out += "<h3>Run</h3>" + _kv([p for p in run if p[1] is not None])
    v = r.get("versions") or {}
    if v:
        blas = v.get("blas") or {}
        libs = ", ".join(f"{x['library']} {x['version']}" for x in blas.get("libraries", []))
        out += "<h4>Versions</h4>" + _kv([(k, str(v[k])) for k in ("estpipe", "python", "numpy", "scipy", "dask") if k in v]
                                         + ([("BLAS", f"{libs}, {blas.get('threads_per_worker')} threads per worker")]
                                            if libs else []))
    config = r.get("config") or {}
    if config:  # the run's provenance: every option it ran with (those left at null are defaults)
        out += ("<details><summary>Options of the run (config)</summary>"
                + _kv([(k, "null" if val is None else str(val)) for k, val in config.items()]) + "</details>")
    return out


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 62em; color: #222; }
h1 { font-size: 1.4em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { padding: .15em .6em; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child { text-align: left; }
.kv th { text-align: left; font-weight: normal; color: #555; }
.banner { padding: .6em 1em; margin: 1em 0; border-radius: 4px; font-weight: bold; }
.bad { background: #fde0dd; color: #7a0177; border: 1px solid #c51b8a; }
.good { background: #e5f5e0; color: #00441b; border: 1px solid #41ab5d; }
img { display: block; margin: .5em 0; max-width: 100%; }
.small { font-size: .85em; color: #555; }
"""


def render(results: dict) -> str:
    """The report's HTML for a results dictionary (see the module docstring)."""
    for key in ("params", "param_names", "std_errors"):
        if key not in results:
            raise UserError(f"the results have no {key!r}: not an estpipe results file (estpipe estimate --out)")
    plt = _pyplot()
    r = results
    mle = r.get("estimator") == "mle"
    method = "maximum likelihood" if mle else f"GMM ({len(r.get('steps') or []) or '?'} step(s))"
    title = f"estpipe: {(r.get('config') or {}).get('model', 'logit')} by {method}"
    converged = r.get("converged", True)
    banner = (f'<div class="banner good">converged: {html.escape(str(r.get("message", "")))}</div>' if converged else
              f'<div class="banner bad">NOT CONVERGED: {html.escape(str(r.get("message", "")))}; do not use these '
              'estimates before the optimizer converges (more --max-iter, another --start or --optimizer)</div>')
    parts = [f"<h1>{html.escape(title)}</h1>", banner,
             f"<p>{html.escape(str((r.get('data') or {}).get('path', '')))}; {html.escape(str(r.get('se_type', '')))} "
             "standard errors</p>",
             "<h2 id=\"estimates\">Estimates</h2>", _estimates_table(r),
             _img(_estimates_plot(r, plt), "estimates with 95% intervals", "estimates-plot")]
    if r.get("truth") and all(_finite(t) for t in r["truth"]) and any(_finite(v) and v > 0 for v in r["std_errors"]):
        parts += ["<h3>Standardized errors against the truth</h3>",
                  _img(_standardized_plot(r, plt), "standardized errors", "standardized-plot")]
    conv = _convergence(r, plt)
    if conv:
        parts += ["<h2 id=\"convergence\">Convergence</h2>", conv]
    mom = _moments(r, plt)
    if mom:
        parts += ["<h2 id=\"moments\">Moment conditions</h2>", mom]
    like = _likelihood(r)
    if like:
        parts += ["<h2 id=\"likelihood\">Likelihood</h2>", like]
    parts += ["<h2 id=\"data-run\">Data and run</h2>", _data_and_run(r, plt)]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(results: dict, path: str | os.PathLike) -> Path:
    """Write the HTML report of `results` (a results file's dictionary) to `path`, atomically."""
    path = Path(path)
    text = render(results)
    write_bytes_atomic(path, text.encode("utf-8"))
    return path
