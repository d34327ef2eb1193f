"""Show what a choice-data file holds: sizes, set-size distribution, the alternatives, the panel
units (decision makers: count, sets per unit), the nests of a nested-logit simulation, parameter
and moment names, provenance, true parameters by name (simulated data) and the data fingerprint.
Reads no arrays but the offsets, the cluster and panel ids and the first and last rows. A table on
stdout, or JSON with `--json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

NAME = "inspect"
EPILOG = "Example: `estpipe inspect data.h5 --json`"


def command(
    data: Annotated[Path, typer.Argument(help="A choice-data file (HDF5) made by `estpipe simulate` or `estpipe load`.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    from estpipe.data.format import ChoiceDataFile

    with ChoiceDataFile(data) as f:
        info = f.describe()
    if json_output:
        typer.echo(json.dumps(info, indent=2))
    else:
        typer.echo(render_table(info))


def render_table(info: dict) -> str:
    """The describe() dict as aligned text."""
    s = info["set_sizes"]
    lines = [
        f"file            {info['path']}",
        f"format          {info['format']} v{info['format_version']}",
        f"fingerprint     {info['fingerprint']}",
        f"sets            {info['n_sets']:,}",
        f"rows            {info['n_rows']:,}",
        f"params (K)      {info['n_params']}",
        f"moments (M)     {info['n_moments']}",
        f"set sizes       min {s['min']}, median {s['median']:g}, mean {s['mean']:.2f}, max {s['max']}",
        f"chosen          {'yes' if info['has_chosen'] else 'no'}",
        f"clusters        {info['n_clusters'] if info['has_cluster'] else 'none'}",
        f"alternatives    {_alternatives(info)}",
        f"panel units     {_panel(info)}",
        *([f"nests           {info['nests']}"] if info.get("nests") else []),
        "",
        "size  sets",
        *(f"{k:>4}  {v:,}" for k, v in s["counts"].items()),
        "",
    ]
    truth = info["truth"]
    if truth is not None:
        # the true parameters of the simulated model, by name (they may be more than the x columns)
        names = info.get("truth_names") or info["param_names"]
        lines += ["x columns", "  " + ", ".join(info["param_names"]), ""]
        width = max(len(n) for n in names)
        lines.append(f"{'param':<{width}}  truth")
        lines += [f"{name:<{width}}  {value: .6f}" for name, value in zip(names, truth)]
    else:
        lines += ["params", *info["param_names"]]
    lines += ["", "moments", "  " + ", ".join(info["moment_names"]), "", "provenance"]
    for key, value in info["provenance"].items():
        lines.append(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return "\n".join(lines)


def _alternatives(info: dict) -> str:
    names = info.get("alt_names")
    if names is None:
        return "not stored (load with --alt-col)"
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    return f"{len(names)}: {shown}"


def _panel(info: dict) -> str:
    panel = info.get("panel")
    if panel is None:
        return "none (each set its own decision maker; load with --panel-col)"
    per = panel["sets_per_unit"]
    return f"{panel['n_units']:,} decision makers, sets per unit min {per['min']}, mean {per['mean']:.2f}, max {per['max']}"
