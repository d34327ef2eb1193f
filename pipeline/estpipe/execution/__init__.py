"""Partitions and execution back ends (in-process, dask LocalCluster, an existing dask cluster,
dask-jobqueue), all behind one Evaluator interface."""

from __future__ import annotations

from pathlib import Path

from estpipe.execution.evaluator import Evaluator, EvaluatorStats, InProcessEvaluator
from estpipe.execution.memory import available_memory, check_fits_machine, cpu_count, plan_memory
from estpipe.execution.planning import Partition, default_partitions, plan_partitions
from estpipe.execution.tasks import PartitionSource


def make_evaluator(path, options, partitions, *, K, M, has_chosen, has_cluster, fingerprint, log) -> Evaluator:
    """The back end the options choose (DESIGN.md, "Data flow"), with every partition loaded:
    --scheduler / --scheduler-file: an existing cluster; --jobqueue KIND --workers N: batch-job
    workers; --workers N > 1: a LocalCluster; otherwise in-process. Memory is checked first.

    partitions: the list, or plan(n_workers) -> the list, called once the number of workers is
    known (for an existing cluster, only once connected: one partition per worker present)."""
    from estpipe.execution import dask_backend as db

    plan = partitions if callable(partitions) else (lambda n_workers: partitions)
    common = dict(path=path, K=K, M=M, has_chosen=has_chosen, has_cluster=has_cluster,
                  model=options.model, derivatives=options.derivatives, fingerprint=fingerprint, log=log)
    if options.scheduler or options.scheduler_file:
        return db.connect_existing(options.scheduler, options.scheduler_file, options.connect_timeout, plan=plan,
                                   **common)
    if options.jobqueue:
        return db.start_jobqueue(options.jobqueue, options.workers, options.connect_timeout,
                                 partitions=plan(options.workers), **common)
    if options.workers > 1:
        return db.start_local_cluster(options.workers, partitions=plan(options.workers), **common)
    partitions = plan(1)
    memory = plan_memory(partitions, [0] * len(partitions), 1, K, M, has_chosen, has_cluster, new_processes=False,
                         model=options.model, derivatives=options.derivatives, threads=cpu_count())
    check_fits_machine(memory, available_memory(), "this process",
                       "run on a cluster (--scheduler, --jobqueue) whose workers together have enough memory")
    source = PartitionSource(str(Path(path).resolve()), fingerprint, options.model, options.derivatives)
    return InProcessEvaluator().load(source, partitions)


__all__ = ["Evaluator", "EvaluatorStats", "InProcessEvaluator", "Partition", "PartitionSource", "default_partitions",
           "make_evaluator", "plan_partitions"]
