"""NTK Gram tensors computed tile by tile into a zarr store (DESIGN.md §4), by the ranks of
a process group (or one process).

The Gram tensor ``K[a, i, b, j] = J_a(x_i) . J_b(x_j)`` of shape ``(c, n, c, n)`` is stored
in chunks ``(c, B, c, B)``; tile ``(I, J)`` covers examples ``[I*B, (I+1)*B)`` x
``[J*B, (J+1)*B)`` of the dataset's own index order (the last tile may be smaller). Only
tiles ``I <= J`` are computed; the mirror ``(J, I)`` is written from the same result by the
same writer. Each chunk is written whole by the one rank that computed it.

Per rank, memory holds the features of one row panel (``B`` examples) and of one column
tile at a time, plus one ``(c, B, c, B)`` block: independent of ``n``.

Entry points: :func:`build_gram_store` (what ``GramMatrix(..., store=path)`` runs, through
:class:`nngeo_dist.object.stored.FMatStored`), and :func:`compute_gram_tile` (one tile, also
used by the dask engine).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .job import (
    finish_job,
    BackgroundWrites,
    DataSource,
    OutputSelection,
    HookedWriter,
    JobReport,
    Progress,
    barrier,
    chunk_size,
    data_fingerprint,
    function_identity,
    function_probe,
    model_fingerprint,
    now,
    outputs_id,
    parse_outputs,
    prepare_store,
    select_outputs,
    split_contiguous,
)
from .layout import StoreSpec, _store_name, normalise_dtype
from .tiles import write_gram_tile

log = logging.getLogger("nngeo_dist.store")

__all__ = [
    "default_tile", "gram_spec", "tile_generator", "tile_features", "gram_block_from_features",
    "compute_gram_tile", "build_gram_store",
]

#: Largest default tile block, in entries of the (c B)^2 block (8 M entries: 32 MB float32).
DEFAULT_TILE_ENTRIES = 8 * 1024 * 1024


def default_tile(n: int, c: int) -> int:
    """A tile size ``B`` with a ``(c B)^2`` block of at most 8 M entries (and ``B <= n``),
    rounded down to a multiple of 64 when larger than 64."""
    B = max(1, int(math.isqrt(DEFAULT_TILE_ENTRIES)) // max(1, c))
    if B > 64:
        B -= B % 64
    return max(1, min(n, B))


def job_function(generator, outputs: Any = None) -> tuple[Callable, Any]:
    """``(function, outputs)`` of a job: the generator's function and the parsed output
    selection; a function that already is an :class:`~nngeo_dist.store.job.OutputSelection`
    (e.g. made by ``GramMatrix(..., outputs=...)``) is unwrapped into its function and
    selection, so that the fingerprint records the selection either way."""
    outputs = parse_outputs(outputs)
    fn = generator.function
    if isinstance(fn, OutputSelection):
        if outputs is not None and outputs != fn.outputs:
            raise ValueError(
                f"two output selections: the function selects {outputs_id(fn.outputs)!r} and "
                f"outputs={outputs_id(outputs)!r}; give one"
            )
        return fn.function, fn.outputs
    return fn, outputs


def tile_generator(generator, outputs: Any = None):
    """A Generator for the tile computations: ``generator``'s model, layers and function
    (restricted to ``outputs``), without progress bars of its own."""
    from ..generator import Generator

    fn, outputs = job_function(generator, outputs)
    return Generator(
        generator.model,
        select_outputs(fn, outputs),
        layer_collection=generator.layer_collection,
        max_outputs=generator.capturer.max_outputs,
        progress=False,
    )



@dataclass
class Job:
    """What every tiled job (Gram, Jacobian) shares once its store is prepared."""

    t0: float
    function: Callable  # the user's function (outputs not yet selected)
    outputs: Any  # the normalised output selection
    group: Any
    rank: int
    world: int
    gen: Any
    source: DataSource
    spec: StoreSpec
    state: dict
    report: JobReport
    itemsize: int
    bar: Progress

    def tile_written(self, writer, tile: tuple, nbytes: int, tile_log: Optional[str]) -> None:
        """Book-keeping after ``tile`` (``nbytes`` on disk) is written (writer thread)."""
        writer.finished(tile, tile_log, self.rank)
        self.report.tiles_computed += 1
        self.report.bytes_written += nbytes
        self.report.computed.append(tile)
        self.bar.update(1, nbytes)


def open_job(generator, loader, store, group, outputs, progress, batch_size, user_function,
             make_spec: Callable, what: str, desc: str, **store_kw) -> Job:
    """Resolve the group, wrap the function for ``outputs``, build the job's spec
    (``make_spec(gen, source, c, function, outputs)``, ``outputs`` normalised), check that every rank runs the same job on
    the same store, and create, validate or resume the store (rank 0; ``store_kw`` go to
    :func:`prepare_store`)."""
    from ..dist.errors import collective_errors
    from ..dist.fingerprint import check_same_across_ranks
    from ..dist.group import rank, resolve_group, world_size

    t0 = now()
    group = resolve_group(group)
    base_function, outputs = job_function(generator, outputs)
    if progress is None:
        progress = getattr(generator, "progress", None)  # GramMatrix(..., progress=...)
    gen = tile_generator(generator, outputs)
    source = DataSource(loader, batch_size)
    with collective_errors(group):
        probe = function_probe(gen.function, source, gen.device)  # (k, c)
        c = probe.shape[1]
        generator._check_n_output(c)  # n_output=, as the in-memory helpers check it
        spec = make_spec(gen, source, c, user_function if user_function is not None else base_function,
                         outputs)
        spec.meta["function_probe"] = probe.reshape(-1).tolist()
    check_same_across_ranks(spec.fingerprint, f"the settings of {what} (model, data, "
                            "function, outputs, tile, dtype)", group,
                            "give every rank the same model, dataset and arguments")
    check_same_across_ranks(_store_name(store), "the store paths", group,
                            "pass every rank the same store path (on a file system they all see)")
    state = prepare_store(store, spec, group, **store_kw)
    total = len(state["pending"]) + state["done_before"]
    report = JobReport(path=_store_name(store), tiles_total=total,
                       tiles_done_before=state["done_before"], altered=state["altered"])
    itemsize = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    bar = Progress(total, state["done_before"], group, enabled=progress, desc=desc)
    return Job(t0, base_function, outputs, group, rank(group), world_size(group), gen, source, spec, state, report, itemsize, bar)

def gram_spec(generator, source: DataSource, tile: Optional[int], dtype: Any, outputs: Any,
              function_id: Optional[str], user_function: Optional[Callable], c: int,
              meta: Optional[dict] = None) -> StoreSpec:
    """The store spec (and fingerprint) of a Gram job."""
    n = source.n
    B = chunk_size(tile, "tile") or default_tile(n, c)
    dtype = normalise_dtype(dtype or generator.dtype)
    fp = {
        "model": model_fingerprint(generator.model, generator.layer_collection),
        "data": data_fingerprint(source.dataset),
        "function": function_identity(user_function, function_id),
        "outputs": outputs_id(outputs),
        "tile": str(B),
        "dtype": dtype,
    }
    m = {"representation": "FMatDense", "n": n, "c": c, "d": generator.layer_collection.numel(),
         "outputs": outputs_id(outputs), "function": fp["function"]}
    m.update(meta or {})
    return StoreSpec.gram(c, n, B, dtype, fp, m)


def tile_features(generator, source: DataSource, I: int, B: int) -> list:
    """Gram features of the examples of tile ``I`` (per batch, see Generator.gram_features).

    ``n_total=B`` for every tile, so that every layer picks the same kind of features for
    every tile (the last, smaller, tile included) and any two tiles pair up.
    """
    start, stop = I * B, min((I + 1) * B, source.n)
    feats = generator.gram_features(source.loader(start, stop), n_total=B)
    source.check_read(start, stop, sum(n_b for n_b, _ in feats))
    return feats


def gram_block_from_features(generator, f_rows: list, f_cols: Optional[list]) -> Tensor:
    """``(c, bI, c, bJ)`` block between two tiles' features; ``f_cols=None``: the diagonal
    tile of ``f_rows`` (a symmetric product)."""
    if f_cols is None:
        return generator.gram_symmetric(f_rows)
    return generator.gram_block(f_rows, f_cols)


def compute_gram_tile(generator, source: DataSource, I: int, J: int, B: int,
                      f_rows: Optional[list] = None) -> Tensor:
    """Block ``K[:, I-tile, :, J-tile]`` (``I <= J``), computing the features it needs
    (``f_rows``: the row tile's features, when already at hand)."""
    if f_rows is None:
        f_rows = tile_features(generator, source, I, B)
    if I == J:
        return gram_block_from_features(generator, f_rows, None)
    return gram_block_from_features(generator, f_rows, tile_features(generator, source, J, B))


def build_gram_store(
    generator,
    loader,
    store: Any,
    tile: Optional[int] = None,
    group=None,
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
    background_writes: bool = True,
) -> JobReport:
    """Compute the Gram tensor of ``generator`` over ``loader``'s dataset into ``store``.

    Every rank of ``group`` calls it with the same model, dataset and arguments (the loader
    may be the whole dataset or this rank's shard: only its dataset and batch size are
    used). Rank 0 creates or validates the store; the pending tiles ``I <= J`` are split
    between the ranks in contiguous runs; each rank writes its tiles (and their mirrors);
    rank 0 marks the store complete. Returns a :class:`JobReport` (same totals on every
    rank).

    Args:
        generator: a :class:`~nngeo_dist.generator.Generator` (model, function, layers).
        loader: DataLoader or map-style Dataset.
        store: path or fsspec URL of the zarr store.
        tile: tile size ``B`` in examples (default :func:`default_tile`).
        resume: reuse a store of the same job (done tiles are skipped); a store of another
            job is refused with :class:`~nngeo_dist.store.StoreMismatchError`.
        overwrite: delete an existing store first.
        dtype: store dtype (default: the model's).
        outputs: ``None``/``'all'``, a list of output indices, or ``('diff', c1, c2)`` for
            ``f_c2 - f_c1``.
        function_id: a string identifying the function in the fingerprint (default: its
            ``module.qualname``; ``'model(batch[0])'`` for the default function).
        user_function: the function as the user gave it (for its identity).
        progress: tqdm bar on rank 0 (True: always; None: on a terminal; False: off).
        tile_log: append ``rank I J`` per finished tile to this file (default: env
            ``NNGEO_DIST_TILE_LOG``).
        verify_on_resume: recompute the checksums of tiles already done when resuming;
            altered tiles are recomputed.
        batch_size: examples per forward/backward pass inside a tile (default: the
            loader's). With ``batch_size >= tile`` a tile's block is one product per layer.
        background_writes: write each tile on a background thread while the next one is
            computed (at most one tile waiting: memory stays bounded).
    """
    from ..dist.errors import collective_errors

    def make_spec(gen, source, c, function, outputs):
        return gram_spec(gen, source, tile, dtype, outputs, function_id, function, c, meta)

    job = open_job(generator, loader, store, group, outputs, progress, batch_size, user_function,
                   make_spec, "the Gram job", "Gram tiles", resume=resume, overwrite=overwrite,
                   verify_on_resume=verify_on_resume, storage_options=storage_options)
    group, r, gen, source, spec, report, bar = (
        job.group, job.rank, job.gen, job.source, job.spec, job.report, job.bar)
    B = spec.chunks[1]
    mine = split_contiguous(job.state["pending"], r, job.world)

    def write(I: int, J: int, block: Tensor) -> None:  # on the writer thread
        write_gram_tile(writer, I, J, block)
        job.tile_written(writer, (I, J), block.numel() * job.itemsize * (1 if I == J else 2), tile_log)

    try:
        with collective_errors(group):
            writer = HookedWriter(store, storage_options)
            with BackgroundWrites(threads=background_writes) as writes:
                row, f_rows = None, None
                for I, J in mine:
                    if I != row:
                        row, f_rows = I, None
                        f_rows = tile_features(gen, source, I, B)
                    block = compute_gram_tile(gen, source, I, J, B, f_rows)
                    writes.submit(write, I, J, block.detach().cpu())
                    del block
        barrier(group)
    finally:
        bar.close()
    finish_job(writer, report, group, job.t0)
    log.info("Gram store %s: %d tiles computed here (%d in all), %d found done, %.2f s",
             report.path, report.tiles_computed, report.tiles_computed_all,
             report.tiles_done_before, report.seconds)
    return report
