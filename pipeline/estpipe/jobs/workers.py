"""Wait, with a bound, for a dask scheduler file and N workers; used by the rendered batch scripts.

    python -m estpipe.jobs.workers SCHEDULER_FILE N [--timeout SECONDS]

Exits 0 when N workers are registered, 2 with one line on stderr when they are not in time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from estpipe.errors import UserError


def wait_for_job_workers(scheduler_file: str | Path, count: int, timeout: float) -> int:
    """Wait until the scheduler in `scheduler_file` has `count` workers, all within `timeout`
    seconds (execution.clusters.wait_for_workers' rule); return the number seen."""
    from distributed import Client

    from estpipe.execution.clusters import wait_for_workers

    scheduler_file = Path(scheduler_file)
    deadline = time.monotonic() + timeout
    while not scheduler_file.exists():
        if time.monotonic() > deadline:
            raise UserError(f"no dask scheduler wrote {scheduler_file} within {timeout:.0f} s; see the job log")
        time.sleep(0.2)
    left = max(1.0, deadline - time.monotonic())
    with Client(scheduler_file=str(scheduler_file), timeout=left, set_as_default=False) as client:
        return len(wait_for_workers(
            client, count, max(1.0, deadline - time.monotonic()),
            lambda seen: f"only {seen} of {count} dask workers joined {scheduler_file} within {timeout:.0f} s; "
                         "see the job log for why the others did not start"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m estpipe.jobs.workers", description=__doc__.splitlines()[0])
    parser.add_argument("scheduler_file")
    parser.add_argument("count", type=int)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        seen = wait_for_job_workers(args.scheduler_file, args.count, args.timeout)
    except UserError as exc:
        print(f"estpipe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"estpipe: {seen} dask workers ready", file=sys.stderr)


if __name__ == "__main__":
    main()
