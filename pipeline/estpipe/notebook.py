"""The notebook API (README, "From a notebook"): estpipe on pandas DataFrames and in Python calls,
thin over the code the CLI runs.

    estpipe.from_frame(df, "data.h5", set_col=..., choice_col=..., x=[...], ...) -> LoadSummary
    estpipe.estimate("data.h5", model=..., estimator=..., workers=..., ...)   -> Results
    estpipe.simulate("data.h5", sets=..., ...)                                -> Simulated

`from_frame` goes through data/load.py's `load_choice_data`, the code of `estpipe load`, with
the DataFrame as its table (an Arrow table of the frame's columns): every check is the same, and
the file is the same as `estpipe load` of the frame written as CSV, up to provenance. Messages
name the Python arguments (`x`, `set_col`) and the frame's rows (position and index label).
`estimate` is orchestration.estimate with keyword options (EstimateOptions' fields; an unknown
one is a UserError with a guess) and no printing unless `verbose`. Results has `summary()`,
`to_frame()`, `_repr_html_()` and `report(path)` (estimation/results.py).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from estpipe.errors import UserError
from estpipe.registry import did_you_mean


def _pandas():
    try:
        import pandas
    except ImportError:
        raise UserError('this needs pandas, which the core install does not include: pip install "estpipe[notebook]"') from None
    return pandas


def from_frame(df, out, *, set_col: str, choice_col: str, x, z=None, dm=None, alt_col: str | None = None,
               asc: bool = False, asc_base: str | None = None, cluster_col: str | None = None,
               panel_col: str | None = None, batch_rows: int | None = None):
    """Write the long-format DataFrame `df` (one row per available alternative) as the
    choice-data file `out`, with every check of `estpipe load` (see load_choice_data for the
    arguments; x, z, dm: lists of column names or comma-separated text). Returns the
    LoadSummary. Raises UserError naming the argument and the frame's row; leaves no file."""
    pd = _pandas()
    import pyarrow as pa

    from estpipe.data.load import DEFAULT_BATCH_ROWS, FrameTable, load_choice_data

    if not isinstance(df, pd.DataFrame):
        raise UserError(f"from_frame: df must be a pandas DataFrame, got {type(df).__name__}")
    names = [str(c) for c in df.columns]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"DataFrame: column {twice[0]!r} appears {names.count(twice[0])} times; rename the columns so "
                        "that every name is unique")
    if len(df) == 0:
        raise UserError("DataFrame: no rows; from_frame needs one row per available alternative")
    frame_df = df.set_axis(names, axis=1)
    used = _used_columns(set_col, choice_col, x, z, dm, alt_col, cluster_col, panel_col)
    for argument, name in used:
        if name not in names and name in [str(n) for n in df.index.names if n is not None]:
            raise UserError(f"DataFrame: {name!r} (asked by {argument}) is the frame's index, not a column; pass "
                            "df.reset_index() to make it one")
    # Only the used columns go to Arrow (the loader reads no other): an unused column of any type
    # is no obstacle, and a wide frame converts fast. The loader still sees every name.
    keep = [c for c in dict.fromkeys(name for _, name in used) if c in names]
    frame_df = frame_df[keep]
    mixed = [c for c in keep if frame_df[c].dtype == object]
    if mixed:  # object columns (mixed types) as text, which the loader parses with the row of a bad value
        frame_df = frame_df.assign(**{c: frame_df[c].map(lambda v: None if pd.isna(v) else str(v)) for c in mixed})
    try:
        table = pa.Table.from_pandas(frame_df, preserve_index=False)
    except pa.ArrowException as exc:
        raise UserError(f"DataFrame: a column cannot be converted to Arrow ({' '.join(str(exc).split())}); give every "
                        "used column one type (numbers, or text for ids)") from None
    frame = FrameTable(table, df.index, batch_rows or DEFAULT_BATCH_ROWS, names=names)
    summary = load_choice_data(frame, out, set_col=set_col, choice_col=choice_col, x=x, z=z, dm=dm, alt_col=alt_col,
                               asc=asc, asc_base=asc_base, cluster_col=cluster_col, panel_col=panel_col,
                               command="estpipe.from_frame")
    for note in summary.notes:  # what `estpipe load` prints on stderr as "estpipe: note: ..."; a notebook shows warnings
        warnings.warn(f"estpipe: note: {note}", UserWarning, stacklevel=2)
    return summary


def _used_columns(set_col, choice_col, x, z, dm, alt_col, cluster_col, panel_col) -> list[tuple[str, str]]:
    """(argument, column name) of every column the load reads; lists as the loader splits them
    (a bad list is left for the loader's own message)."""
    used = []
    for argument, value in (("set_col", set_col), ("choice_col", choice_col), ("alt_col", alt_col),
                            ("cluster_col", cluster_col), ("panel_col", panel_col), ("x", x), ("z", z), ("dm", dm)):
        if value is None:
            continue
        if isinstance(value, str):
            names = value.split(",") if argument in ("x", "z", "dm") else [value]
        else:
            try:
                names = list(value)
            except TypeError:
                continue
        used += [(argument, str(n).strip()) for n in names]
    return used


def _options(kwargs: dict):
    from estpipe.orchestration import EstimateOptions

    valid = [f.name for f in fields(EstimateOptions)]
    for key in kwargs:
        if key not in valid:
            raise UserError(f"estimate: unknown option {key!r}{did_you_mean(key, valid)}; the options are: "
                            f"{', '.join(valid)}")
    # Values are EstimateOptions' to check (start: numbers or "0.1,-2" text), as for the CLI.
    return EstimateOptions(**kwargs)


def estimate(path: str | os.PathLike, *, verbose: bool = False, **options):
    """Estimate on the choice-data file at `path` with `options` (the fields of EstimateOptions,
    spelled as in Python: model="mixed-logit", random="time", estimator="mle", workers=2, ...).
    Returns the Results (summary(), to_frame(), report(path)), with a UserWarning when the run did
    not converge (the CLI's exit code 3). A results file (out=) that cannot be written raises
    ResultsNotWritten, a UserError whose `results` holds them. verbose: progress lines on stderr,
    as the CLI prints them."""
    from estpipe.estimation.gmm import Reporter
    from estpipe.orchestration import estimate as run

    opts = _options(dict(options))
    reporter = None
    if verbose:
        from estpipe.cli.reporters import StderrReporter

        reporter = StderrReporter()
    results = run(path, opts, reporter=reporter or Reporter())
    if not results.converged:  # the CLI's exit code 3; here the results come back, with a warning
        warnings.warn(f"estpipe: NOT converged: {results.message.rstrip('.')}; the estimates are where it stopped "
                      "(results.converged is False)", UserWarning, stacklevel=2)
    return results


@dataclass
class Simulated:
    """What `simulate` wrote: the file's path, the true parameters by name (None for the seed
    design), and the run's summary."""

    path: Path
    truth: dict | None
    summary: object


def simulate(path: str | os.PathLike, *, alternatives=30, **options) -> Simulated:
    """Simulate choice data into the file at `path` (the options of `estpipe simulate`:
    design, sets, alternatives (a size, "lo:hi" or (lo, hi)), params, moments, seed,
    cluster_size, random, correlated, panel_size, nests). Returns Simulated(path, truth, summary)."""
    import inspect

    from estpipe.data.simulate import simulate_choice_data

    valid = [p for p in inspect.signature(simulate_choice_data).parameters if p not in ("path", "should_stop")]
    for key in options:
        if key not in valid and key != "alternatives":
            raise UserError(f"simulate: unknown option {key!r}{did_you_mean(key, valid)}; the options are: "
                            f"{', '.join(valid)}")
    for key in ("sets", "params", "moments", "seed", "cluster_size", "panel_size", "nests"):
        # the command line's typer makes these whole numbers; from Python, say so rather than truncate
        if key not in options or (options[key] is None and key in ("cluster_size", "panel_size", "nests")):
            continue
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"simulate: {key} must be a whole number, got {value!r}")
    if isinstance(alternatives, str):
        lo, _, hi = alternatives.partition(":")
        try:
            span = (int(lo), int(hi or lo))
        except ValueError:
            raise UserError(f"simulate: alternatives={alternatives!r} is not a size like 30 or a range like '2:30'") from None
    elif isinstance(alternatives, (tuple, list)):
        span = tuple(int(a) for a in alternatives)
    else:
        span = (int(alternatives), int(alternatives))
    summary = simulate_choice_data(path, alternatives=span, **options)
    truth = dict(zip(summary.truth_names or [], summary.truth)) if summary.truth is not None else None
    return Simulated(path=Path(path), truth=truth, summary=summary)
