"""Jacobians ``J`` of shape ``(c, n, d)`` computed row tile by row tile into a zarr store
(DESIGN.md §4): chunks ``(c, B, D0)``; tile ``(I, K)`` covers examples ``[I*B, (I+1)*B)``
and parameters ``[K*D0, (K+1)*D0)`` of the flat order.

One rank computes the Jacobian rows of example tile ``I`` (``(c, B, d)`` in memory) and
writes every parameter chunk ``(I, K)`` of it that is not done yet. Row tiles are split
between ranks in contiguous runs. Used by ``Jacobian(..., store=path)`` (kind
``'jacobian'``) and by the FIM's low-rank representation (kind ``'lowrank'``, the Jacobian
of the FIM square root), through :mod:`nngeo_dist.object.stored`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch

from .gram import open_job
from .job import (
    finish_job,
    BackgroundWrites,
    DataSource,
    HookedWriter,
    JobReport,
    barrier,
    chunk_size,
    data_fingerprint,
    function_identity,
    model_fingerprint,
    outputs_id,
    split_contiguous,
)
from .layout import StoreSpec, normalise_dtype

log = logging.getLogger("nngeo_dist.store")

__all__ = ["default_jacobian_chunks", "jacobian_spec", "build_jacobian_store"]

#: Default bound on one chunk (c, B, D0), in entries (16 M: 64 MB float32).
DEFAULT_CHUNK_ENTRIES = 16 * 1024 * 1024

#: entries of the (c, B, d) Jacobian rows a default example tile may hold in memory (the
#: job holds one tile, plus one being written): 256 MB in float32
DEFAULT_ROW_TILE_ENTRIES = 64 * 1024 * 1024


def default_jacobian_chunks(n: int, c: int, d: int) -> tuple[int, int]:
    """``(B, D0)``: ``B`` up to 1024 examples and at most what keeps a tile's rows
    ``(c, B, d)`` within :data:`DEFAULT_ROW_TILE_ENTRIES` (one example at least), then
    ``D0`` so a chunk holds at most 16 M entries (``D0 = d`` when it fits)."""
    B = max(1, min(n, 1024, DEFAULT_ROW_TILE_ENTRIES // max(1, c * d)))
    D0 = max(1, min(d, DEFAULT_CHUNK_ENTRIES // max(1, c * B)))
    if D0 < d:
        D0 = math.ceil(d / math.ceil(d / D0))  # equal-sized chunks
    return B, D0


def layers_attr(layer_collection) -> list:
    """The layer collection as JSON (the format of :mod:`nngeo_dist.store.objects`), so that
    ``nngeo_dist.load(path)`` rebuilds it for the store-backed object."""
    from .objects import _layers_attr

    return _layers_attr(layer_collection)


def jacobian_spec(generator, source: DataSource, tile: Optional[int], d_chunk: Optional[int],
                  dtype: Any, outputs: Any, function_id: Optional[str], user_function: Optional[Callable],
                  c: int, kind: str = "jacobian", meta: Optional[dict] = None) -> StoreSpec:
    n, d = source.n, generator.layer_collection.numel()
    B0, D00 = default_jacobian_chunks(n, c, d)
    tile, d_chunk = chunk_size(tile, "tile"), chunk_size(d_chunk, "d_chunk")
    B = tile or B0
    D0 = d_chunk or (D00 if not tile else max(1, min(d, DEFAULT_CHUNK_ENTRIES // max(1, c * B))))
    dtype = normalise_dtype(dtype or generator.dtype)
    fp = {
        "model": model_fingerprint(generator.model, generator.layer_collection),
        "data": data_fingerprint(source.dataset),
        "function": function_identity(user_function, function_id),
        "outputs": outputs_id(outputs),
        "tile": f"{B},{D0}",
        "dtype": dtype,
    }
    rep = "PMatLowRank" if kind == "lowrank" else "PushForwardDense"
    m = {"representation": rep, "n": n, "c": c, "d": d, "outputs": outputs_id(outputs),
         "function": fp["function"], "layers": layers_attr(generator.layer_collection)}
    m.update(meta or {})
    return StoreSpec.jacobian(c, n, d, B, D0, dtype, fp, m, kind=kind)


def build_jacobian_store(
    generator,
    loader,
    store: Any,
    tile: Optional[int] = None,
    d_chunk: Optional[int] = None,
    group=None,
    resume: bool = True,
    overwrite: bool = False,
    dtype: Any = None,
    outputs: Any = None,
    function_id: Optional[str] = None,
    user_function: Optional[Callable] = None,
    kind: str = "jacobian",
    progress: Optional[bool] = None,
    tile_log: Optional[str] = None,
    verify_on_resume: bool = True,
    batch_size: Optional[int] = None,
    meta: Optional[dict] = None,
    storage_options: Optional[dict] = None,
    background_writes: bool = True,
) -> JobReport:
    """Compute the Jacobian ``(c, n, d)`` of ``generator`` over ``loader``'s dataset into
    ``store`` in chunks ``(c, tile, d_chunk)``. Arguments as
    :func:`nngeo_dist.store.gram.build_gram_store`; ``kind`` is ``'jacobian'`` or
    ``'lowrank'`` (recorded in the store). Memory: the Jacobian rows of one example tile,
    ``(c, B, d)``, plus the one being written in the background."""
    from ..dist.errors import collective_errors

    def make_spec(gen, source, c, function, outputs):
        return jacobian_spec(gen, source, tile, d_chunk, dtype, outputs, function_id, function,
                             c, kind, meta)

    job = open_job(generator, loader, store, group, outputs, progress, batch_size, user_function,
                   make_spec, f"the {kind} job", f"{kind} chunks", resume=resume,
                   overwrite=overwrite, verify_on_resume=verify_on_resume,
                   storage_options=storage_options)
    group, r, gen, source, spec, report = job.group, job.rank, job.gen, job.source, job.spec, job.report
    B, D0 = spec.chunks[1], spec.chunks[2]
    rows_pending: dict[int, list] = {}
    for I, K in job.state["pending"]:
        rows_pending.setdefault(I, []).append(K)
    mine = split_contiguous(sorted(rows_pending), r, job.world)

    def write(I: int, rows: torch.Tensor) -> None:  # on the writer thread
        for K in rows_pending[I]:
            block = rows[:, :, K * D0:(K + 1) * D0]
            writer.write_tile((I, K), block)
            job.tile_written(writer, (I, K), block.numel() * job.itemsize, tile_log)

    try:
        with collective_errors(group):
            writer = HookedWriter(store, storage_options)
            with BackgroundWrites(threads=background_writes) as writes:
                for I in mine:
                    start, stop = I * B, min((I + 1) * B, source.n)
                    rows, _ = gen.jacobian_rows(source.loader(start, stop))
                    source.check_read(start, stop, rows.shape[1])
                    writes.submit(write, I, rows.detach().cpu())
                    del rows
        barrier(group)
    finally:
        job.bar.close()
    finish_job(writer, report, group, job.t0)
    return report
