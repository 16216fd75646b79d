"""The Gram store computed as a dask task graph on ``dask.distributed``.

One task per pending tile ``(I, J)`` (``I <= J``): it computes the block from the examples
of both tiles, writes its own chunk and the mirror (the same writer protocol as the
torchrun engine: data, checksum, done marker), and returns only its index. The driver
(this process) creates or validates the store, builds the graph, follows it (progress bar:
tiles done / total, GB written) and marks the store complete.

The model, function, layer collection and dataset travel to the workers once (pickled
with cloudpickle, scattered to every worker); each worker process rebuilds its generator
once per job and caches it. Workers run one thread each (a torch computation per worker
process); the torch thread count of LocalCluster workers is ``cpu_count // workers``.

A killed worker's task is rerun elsewhere by the scheduler (its half-written tile is not
marked, so it is simply written again); a killed driver leaves a store that
``resume=True`` completes. The torchrun and dask engines compute each tile by the same
function (:func:`nngeo_dist.store.gram.compute_gram_tile`), so they produce equal stores.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .gram import build_gram_store, compute_gram_tile, gram_spec, open_job, tile_generator
from .job import DataSource, HookedWriter, JobReport, finish_job
from .tiles import write_gram_tile

log = logging.getLogger("nngeo_dist.store")

__all__ = ["GramTileJob", "run_tile", "build_gram_store_dask", "make_client"]


@dataclass
class GramTileJob:
    """Everything a worker needs to compute and write any tile of one Gram store."""

    token: str
    model: torch.nn.Module
    function: Optional[Callable]
    layer_collection: Any
    max_outputs: Optional[int]
    outputs: Any
    source: DataSource
    store: str
    B: int
    storage_options: Optional[dict] = None
    torch_threads: Optional[int] = None
    tile_log: Optional[str] = None


_WORKER_CACHE: dict[str, tuple] = {}


def _worker_state(job: GramTileJob) -> tuple:
    """(generator, writer) of ``job`` in this worker process, built once."""
    state = _WORKER_CACHE.get(job.token)
    if state is None:
        from ..generator import Generator

        if job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        job.model.eval()
        base = Generator(job.model, job.function, layer_collection=job.layer_collection,
                         max_outputs=job.max_outputs, progress=False)
        gen = tile_generator(base, job.outputs)
        writer = HookedWriter(job.store, job.storage_options)
        _WORKER_CACHE.clear()  # one job at a time per worker: drop older ones
        state = _WORKER_CACHE[job.token] = (gen, writer)
    return state


def run_tile(job: GramTileJob, I: int, J: int) -> tuple[int, int]:
    """Compute tile ``(I, J)`` and write it (and its mirror); returns ``(I, J)``."""
    gen, writer = _worker_state(job)
    if writer.is_done((I, J)) and writer.is_done((J, I)):
        return (I, J)  # a rerun of a task whose first run finished (e.g. worker lost after)
    block = compute_gram_tile(gen, job.source, I, J, job.B)
    write_gram_tile(writer, I, J, block)
    writer.finished((I, J), job.tile_log, -os.getpid())
    return (I, J)


def make_client(scheduler: Optional[str] = None, workers: Optional[int] = None,
                processes: bool = True):
    """(client, cluster or None): a Client on ``scheduler`` (an address), or on a new
    LocalCluster of ``workers`` processes (default: CPU count, at most 4), 1 thread each."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                           dashboard_address=":0")  # a free port: never collides with another job
    log.info("dask LocalCluster: %d worker processes x 1 thread, dashboard %s", workers,
             getattr(cluster, "dashboard_link", "?"))
    return Client(cluster), cluster


def build_gram_store_dask(
    generator,
    loader,
    store: Any,
    tile: Optional[int] = None,
    client=None,
    scheduler: Optional[str] = None,
    workers: Optional[int] = None,
    processes: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    dtype: Any = None,
    outputs: Any = None,
    function_id: Optional[str] = None,
    user_function: Optional[Callable] = None,
    progress: Optional[bool] = None,
    tile_log: Optional[str] = None,
    verify_on_resume: bool = True,
    batch_size: Optional[int] = None,
    meta: Optional[dict] = None,
    storage_options: Optional[dict] = None,
    torch_threads: Optional[int] = None,
) -> JobReport:
    """The Gram store of :func:`nngeo_dist.store.gram.build_gram_store`, computed by dask
    workers: ``client`` (a ``distributed.Client``), else a Client on ``scheduler``
    (address of an existing cluster), else a LocalCluster of ``workers`` processes with one
    thread each (closed at the end). The store path must be reachable by every worker
    (a shared file system or an fsspec URL). Call it from one process (not under torchrun).
    """
    import dask
    from distributed import as_completed

    def make_spec(gen, source, c, function, outputs):
        return gram_spec(gen, source, tile, dtype, outputs, function_id, function, c, meta)

    job = open_job(generator, loader, store, None, outputs, progress, batch_size, user_function,
                   make_spec, "the Gram job", "Gram tiles (dask)", resume=resume, overwrite=overwrite,
                   verify_on_resume=verify_on_resume, storage_options=storage_options)
    spec, report, bar, pending = job.spec, job.report, job.bar, job.state["pending"]
    writer = HookedWriter(store, storage_options)
    if pending:
        own_client = client is None
        cluster = None
        if own_client:
            client, cluster = make_client(scheduler, workers, processes)
            if torch_threads is None and cluster is not None:
                torch_threads = max(1, (os.cpu_count() or 1) // max(1, len(cluster.workers)))
        store_str = str(store) if not hasattr(store, "__fspath__") else os.fspath(store)
        if "://" not in store_str:
            store_str = os.path.abspath(store_str)
        tiles = GramTileJob(
            token=uuid.uuid4().hex, model=generator.model, function=job.function,
            layer_collection=generator.layer_collection, max_outputs=generator.capturer.max_outputs,
            outputs=job.outputs, source=job.source, store=store_str, B=spec.chunks[1],
            storage_options=storage_options, torch_threads=torch_threads, tile_log=tile_log,
        )
        try:
            [job_future] = client.scatter([tiles], broadcast=True, hash=False)
            tasks = [
                dask.delayed(run_tile, pure=False)(job_future, I, J,
                                                   dask_key_name=f"gram-tile-{I}-{J}-{tiles.token}")
                for I, J in pending
            ]
            futures = client.compute(tasks)
            for fut in as_completed(futures):
                I, J = fut.result()
                nbytes = spec.tile_shape((I, J))
                nbytes = int(torch.Size(nbytes).numel()) * job.itemsize * (1 if I == J else 2)
                report.tiles_computed += 1
                report.bytes_written += nbytes
                report.computed.append((I, J))
                bar.update(1, nbytes)
        finally:
            if own_client:
                client.close()
                if cluster is not None:
                    cluster.close()
    bar.close()
    return finish_job(writer, report, None, job.t0)


def build_gram_store_engine(engine: str, *args, **kw) -> JobReport:
    """``build_gram_store`` (engine ``'torchrun'``) or ``build_gram_store_dask`` (``'dask'``)."""
    if engine == "dask":
        return build_gram_store_dask(*args, **kw)
    if engine != "torchrun":
        raise ValueError(f"engine={engine!r}: expected 'torchrun' or 'dask'")
    for k in ("client", "scheduler", "workers", "processes", "torch_threads"):
        kw.pop(k, None)
    return build_gram_store(*args, **kw)
