"""Partitions and execution back ends (in-process, dask LocalCluster, an existing dask cluster,
dask-jobqueue), all behind one Evaluator interface."""

from __future__ import annotations

from estpipe.models import MODELS
from estpipe.models.spec import ModelSpec
from estpipe.execution.backends import BACKENDS, backend_name, cluster_for
from estpipe.execution.clusters import Cluster, wait_for_workers
from estpipe.execution.evaluator import Evaluator, EvaluatorStats, InProcessEvaluator
from estpipe.execution.memory import check_memory
from estpipe.execution.planning import Partition, default_partitions, plan_partitions
from estpipe.execution.tasks import PartitionSource


def start_backend(problem, options, plan, log, model: ModelSpec | None = None) -> Evaluator:
    """The back end the options choose (DESIGN.md, "Data flow"), started, with every partition
    loaded: `scheduler` / `scheduler_file`: an existing cluster; `jobqueue` KIND with `workers`
    N: batch-job workers; `workers` N > 1: a LocalCluster; otherwise in-process.

    problem: the ChoiceProblem; options: reads workers, scheduler, scheduler_file, jobqueue,
    connect_timeout, dashboard, model and derivatives; plan(n_workers) -> the partitions, called once the
    number of workers is known (for an existing cluster, once connected: one partition per worker
    present); log(message) for progress. Memory is checked before anything loads, and for
    processes of this machine before any starts. Partition i goes to worker i mod n. model: the
    ModelSpec the partitions build (default: from the options)."""
    cluster = cluster_for(options)
    source = PartitionSource.of(problem, model or ModelSpec.of(options.model, **options.model_options()),
                                options.derivatives, moments=options.estimator != "mle")
    # the memory check sizes a kernel's buffers on a stand-in of the model's kind
    kind = options.model if options.model in MODELS and not options.model_options() else "logit"

    def placed(n_workers: int):
        partitions = plan(n_workers)
        assignment = [i % n_workers for i in range(len(partitions))]
        check_memory(problem, partitions, assignment, cluster.available_memory(), model=kind,
                     derivatives=source.derivatives, threads=cluster.threads, new_processes=cluster.new_processes,
                     moments=source.moments)
        return partitions, assignment

    if cluster.planned_workers is not None:
        partitions, assignment = placed(cluster.planned_workers)
    cluster.start()
    try:
        if cluster.client is not None:
            log(f"dask: {cluster.description}")
        dashboard = cluster.dashboard()
        if dashboard is not None:
            log(dashboard)
        if cluster.planned_workers is None:
            partitions, assignment = placed(len(cluster.workers()))
        return cluster.evaluator().load(source, partitions, assignment)
    except BaseException:
        cluster.close()
        raise


__all__ = ["BACKENDS", "Cluster", "Evaluator", "EvaluatorStats", "InProcessEvaluator", "Partition", "PartitionSource",
           "backend_name", "cluster_for", "default_partitions", "plan_partitions", "start_backend", "wait_for_workers"]
