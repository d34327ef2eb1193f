"""Time the derivative modes on seed-design data made in memory, all interleaved in one run.

Rows: f, the original code's plain-numpy function evaluation (the yardstick); the kernel's value;
value + Jacobian by dual blocks (fast logit path, and the generic path every model uses; with
--model, also that model on the strategy estimate picks for it, and its ratio to the fused logit); value +
gradient by reverse mode (adjoint); finite differences. Each row gives the median time per call
and its ratio to f, with the BLAS library and its threads, and the tile buffers' memory.

The derivative modes timed are those of `estpipe estimate --derivatives`:
{estpipe.kernel.derivatives:DERIVATIVES}.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from estpipe.errors import UserError

NAME = "bench"
EPILOG = ("Example: `estpipe bench --sets 20000 --alternatives 30 --params 20 --moments 40 --repeat 20 --json`; "
          "`estpipe bench --sets 20000 --model examples/user_logit.py:UserLogit` (the generic path against the fused logit)")


def command(
    sets: Annotated[int, typer.Option(help="Number of choice sets.", min=1)] = 1000,
    alternatives: Annotated[int, typer.Option(help="Alternatives per set.", min=1)] = 30,
    params: Annotated[int, typer.Option(help="Number of covariates K.", min=1)] = 20,
    moments: Annotated[int, typer.Option(help="Number of moments M.", min=1)] = 40,
    repeat: Annotated[int, typer.Option(help="Interleaved calls per row (the median is reported).", min=1)] = 30,
    tile_rows: Annotated[int | None, typer.Option("--tile-rows", help="Rows per tile (default: the kernel's).", min=1)] = None,
    threads: Annotated[int | None, typer.Option(help="Threads over tiles (default: the BLAS thread count).", min=1)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data generator.")] = 0,
    model: Annotated[str | None, typer.Option(help="Also time value + Jacobian of this model (row dual-model, and its "
                                                   "ratio to the fused logit): {estpipe.models:MODELS}, or "
                                                   "my_models.py:ClassName, or an installed model (mixed-logit: random x1..x3; nested-logit: up to 3 contiguous nests).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    from estpipe.bench import run_bench

    if moments < params:
        raise UserError(f"--moments {moments} is smaller than --params {params}: GMM needs M >= K")
    if model is not None:
        from estpipe.models import model_problem

        problem = model_problem(model)
        if problem is not None:
            raise UserError(f"--model: {problem}")
    result = run_bench(sets, alternatives, params, moments, repeat, tile_rows, seed, threads, model=model)
    print(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
