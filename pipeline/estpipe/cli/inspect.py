"""Show what a choice-data file holds: sizes, set-size distribution, parameter and moment names,
provenance, true parameters (simulated data) and the data fingerprint. Reads no arrays but the
offsets, the cluster ids and the first and last rows. A table on stdout, or JSON with `--json`.
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
        "",
        "size  sets",
        *(f"{k:>4}  {v:,}" for k, v in s["counts"].items()),
        "",
    ]
    truth = info["truth"]
    width = max(len(n) for n in info["param_names"]) if info["param_names"] else 4
    lines.append(f"{'param':<{width}}  truth" if truth is not None else "params")
    for i, name in enumerate(info["param_names"]):
        lines.append(f"{name:<{width}}  {truth[i]: .6f}" if truth is not None else name)
    lines += ["", "moments", "  " + ", ".join(info["moment_names"]), "", "provenance"]
    for key, value in info["provenance"].items():
        lines.append(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return "\n".join(lines)
