"""What the store-writing jobs (Gram, Jacobian; torchrun and dask engines) share.

- Data access by example index: a job reads the examples of a tile ``[I*B, (I+1)*B)`` from
  the *dataset* behind the loader it is given (``loader.dataset``, a Dataset passed
  directly, or the examples of a list of batches), so that any rank or dask worker can
  compute any tile. The loader's sampler is
  not used (a sharded or shuffled loader gives the same store as the plain one); its
  batch size and worker settings are.
- Fingerprints: model parameters and buffers, the data (length and a hash of a sample of
  examples), the function's identity, the output selection, tile size and dtype.
- Output selection (``outputs=``): all outputs, a list of indices, or the difference
  ``f_c2 - f_c1`` of two outputs (the binary classifier of the paper's Figure 7).
- The collective start of a job: rank 0 alone creates or validates the store (and checks
  the checksums of tiles already done when resuming); the others wait for its verdict, so
  a refusal raises on every rank; rank 0 then tells everyone which tiles remain.
- Hooks used by tests and by operators: a log of computed tiles (``tile_log=`` or env
  ``NNGEO_DIST_TILE_LOG``) and a fault injector (env ``NNGEO_DIST_FAULT_AFTER_TILES=k``: the
  process SIGKILLs itself in the middle of writing its ``k+1``-th tile, after the data chunk
  and before its checksum and done marker).
- Progress: tiles done / total and GB written, across ranks (through the process group's
  key-value store when there is one).

Tiles are split between ranks as contiguous runs of the pending list, which is in row-major
order (row panel ``I``, then columns ``J >= I``): each rank sees a few consecutive row
panels, computes each row panel's features once, and the column tiles' features one tile
at a time, so its memory is one row panel plus one tile, whatever ``n``.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import pickle
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from ..generator import as_batches
from .layout import StoreSpec, _store_name, create_or_validate
from .tiles import TileWriter, verify

log = logging.getLogger("nngeo_dist.store")

TILE_LOG_ENV = "NNGEO_DIST_TILE_LOG"
FAULT_ENV = "NNGEO_DIST_FAULT_AFTER_TILES"

__all__ = [
    "OutputSelection", "parse_outputs", "outputs_id", "select_outputs",
    "DataSource", "data_fingerprint", "model_fingerprint", "function_identity", "function_probe",
    "check_probe", "sample_indices", "chunk_size",
    "prepare_store", "split_contiguous", "JobReport", "Progress", "HookedWriter", "BackgroundWrites",
]


# ---------------------------------------------------------------------------------------
# output selection
# ---------------------------------------------------------------------------------------
def parse_outputs(outputs: Any) -> Any:
    """Normalise an output selection.

    Accepted: ``None`` / ``'all'`` (every output); a list/tuple of ints or a string
    ``'0,3,5'``; ``('diff', c1, c2)`` or the string ``'c2-c1'`` for ``f_c2 - f_c1``.
    Returns ``None``, a tuple of ints, or ``('diff', c1, c2)``.
    """
    if outputs is None:
        return None
    if isinstance(outputs, str):
        s = outputs.strip().replace(" ", "")
        if s in ("", "all"):
            return None
        if s.startswith("diff"):
            s = s[4:].lstrip(":=")
        if "-" in s:
            parts = s.split("-")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(
                    f"--outputs {outputs!r}: a difference is written c2-c1 (two output "
                    "indices, e.g. 8-3 for f_8 - f_3)"
                )
            c2, c1 = int(parts[0]), int(parts[1])
            return ("diff", c1, c2)
        try:
            idx = tuple(int(p) for p in s.split(",") if p != "")
        except ValueError:
            raise ValueError(
                f"--outputs {outputs!r}: expected 'all', a list of output indices such as "
                "'0,3,5', or a difference 'c2-c1'"
            ) from None
        return parse_outputs(idx)
    if isinstance(outputs, (tuple, list)) and len(outputs) == 3 and outputs[0] == "diff":
        c1, c2 = int(outputs[1]), int(outputs[2])
        if c1 < 0 or c2 < 0 or c1 == c2:
            raise ValueError(f"outputs={outputs!r}: need two different non-negative output indices")
        return ("diff", c1, c2)
    if isinstance(outputs, (tuple, list, range)):
        idx = tuple(int(i) for i in outputs)
        if not idx:
            raise ValueError("outputs=[]: select at least one output")
        if any(i < 0 for i in idx):
            raise ValueError(f"outputs={list(outputs)!r}: output indices must be >= 0")
        if len(set(idx)) != len(idx):
            raise ValueError(f"outputs={list(outputs)!r}: an output is selected twice")
        return idx
    raise TypeError(
        f"outputs={outputs!r}: expected None/'all', a list of output indices, or "
        "('diff', c1, c2)"
    )


def outputs_id(outputs: Any) -> str:
    """The fingerprint string of a (parsed) output selection."""
    outputs = parse_outputs(outputs)
    if outputs is None:
        return "all"
    if outputs[0] == "diff":
        return f"diff:{outputs[2]}-{outputs[1]}"
    return ",".join(str(i) for i in outputs)


class OutputSelection:
    """``function`` restricted to some outputs, or ``f_c2 - f_c1`` (picklable)."""

    def __init__(self, function: Callable, outputs: Any):
        self.function = function
        self.outputs = parse_outputs(outputs)
        self.__name__ = getattr(function, "__name__", type(function).__name__)

    def __call__(self, *batch):
        out = self.function(*batch)
        if out.dim() == 1:
            out = out.unsqueeze(1)
        K = out.shape[1]
        sel = self.outputs
        wanted = sel[1:] if sel[0] == "diff" else sel
        bad = [i for i in wanted if i >= K]
        if bad:
            raise ValueError(
                f"output selection {outputs_id(sel)!r} names output(s) {bad}, but the "
                f"function has {K} outputs (indices 0..{K - 1})"
            )
        if sel[0] == "diff":
            _, c1, c2 = sel
            return out[:, c2:c2 + 1] - out[:, c1:c1 + 1]
        return out[:, list(sel)]


def select_outputs(function: Callable, outputs: Any) -> Callable:
    """``function`` itself for all outputs, else an :class:`OutputSelection` of it."""
    return function if parse_outputs(outputs) is None else OutputSelection(function, outputs)


# ---------------------------------------------------------------------------------------
# data access by example index
# ---------------------------------------------------------------------------------------
_CARRIED = ("collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn",
            "multiprocessing_context", "persistent_workers")


def batches_dataset(batches: Sequence) -> tuple[TensorDataset, int]:
    """The examples of a list of batches (what the in-memory helpers take as a loader), in
    order, as a dataset, and the largest batch's size. Each batch is a tensor or a tuple
    of tensors sharing their first (example) dimension."""
    fields = None
    for k, b in enumerate(batches):
        b = (b,) if isinstance(b, torch.Tensor) else b
        if not (isinstance(b, (tuple, list)) and b and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in b)
                and len({t.shape[0] for t in b}) == 1):
            raise TypeError(
                f"batch {k} of the list is not a tensor or a tuple of tensors with one leading "
                "example dimension: a list given with store= is read as a list of batches, as "
                "without it; pass a DataLoader over a map-style Dataset instead"
            )
        if fields is None:
            fields = [[] for _ in b]
        if len(b) != len(fields):
            raise TypeError(f"batch {k} of the list has {len(b)} tensors, batch 0 has {len(fields)}")
        for j, (f, t) in enumerate(zip(fields, b)):
            if f and t.shape[1:] != f[0].shape[1:]:
                raise TypeError(f"tensor {j} of batch {k} of the list has examples of shape "
                                f"{tuple(t.shape[1:])}, batch 0's {tuple(f[0].shape[1:])}")
            f.append(t.detach())
    if fields is None:
        raise ValueError("the list of batches is empty: nothing to compute")
    sizes = [t.shape[0] for t in fields[0]]
    return TensorDataset(*(torch.cat(f) for f in fields)), max(max(sizes), 1)


class DataSource:
    """The examples of a map-style dataset, read by index range in batches.

    Args:
        loader_or_dataset: a DataLoader (its ``dataset``, ``batch_size``, ``collate_fn`` and
            worker settings are used; its sampler is not), a map-style Dataset, or a list
            of batches (:func:`batches_dataset`: read as the in-memory helpers read it).
        batch_size: overrides the loader's (default: the largest batch of a list; 128 for a
            bare Dataset).
    """

    def __init__(self, loader_or_dataset: Any, batch_size: Optional[int] = None):
        settings: dict[str, Any] = {}
        if isinstance(loader_or_dataset, (list, tuple)):
            loader_or_dataset, largest = batches_dataset(as_batches(loader_or_dataset))
            batch_size = batch_size or largest
        if isinstance(loader_or_dataset, DataLoader):
            if loader_or_dataset.batch_sampler is None:
                # no automatic batching: its dataset yields whole batches, which cannot be
                # split into tiles (a batch_sampler's loader also has batch_size None)
                raise TypeError(
                    "an out-of-core store reads the examples of each tile by index, but this "
                    "DataLoader has batch_size=None (its dataset yields batches, not examples): "
                    "pass a DataLoader with a batch_size over a dataset of examples"
                )
            dataset = loader_or_dataset.dataset
            for k in _CARRIED:
                if hasattr(loader_or_dataset, k):
                    settings[k] = getattr(loader_or_dataset, k)
            if settings.get("num_workers", 0) == 0:
                for k in ("persistent_workers", "multiprocessing_context", "worker_init_fn", "timeout"):
                    settings.pop(k, None)
            batch_size = batch_size or loader_or_dataset.batch_size
        else:
            dataset = loader_or_dataset
        if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                "an out-of-core store reads the examples of each tile by index: pass a "
                "DataLoader over a map-style dataset (with __len__ and __getitem__) or the "
                f"dataset itself, not a {type(dataset).__name__}"
            )
        self.dataset: Dataset = dataset
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("the dataset is empty: nothing to compute")
        self.batch_size = int(batch_size or 128)
        self.settings = settings

    def loader(self, start: int, stop: int, batch_size: Optional[int] = None) -> DataLoader:
        """A DataLoader over examples ``[start, stop)`` in order."""
        bs = min(batch_size or self.batch_size, max(1, stop - start))
        return DataLoader(Subset(self.dataset, range(start, stop)), batch_size=bs, shuffle=False,
                          **self.settings)

    def check_read(self, start: int, stop: int, got: int) -> None:
        """Raise if reading examples ``[start, stop)`` gave ``got`` rows (a collate_fn that
        drops or adds examples), before a tile of the wrong rows is written."""
        if got != stop - start:
            raise ValueError(
                f"the loader gave {got} rows for the {stop - start} examples [{start}, {stop}) "
                "of the dataset: an out-of-core store needs one row per example; pass a "
                "collate_fn that keeps every example of a batch (the tiles already written "
                "are kept: rerun with the fixed loader to resume)"
            )

    def examples(self, indices: Sequence[int]) -> tuple:
        """One batch of the examples at ``indices``, collated as the loader would (a
        collate_fn that drops or adds examples is refused here, before any tile)."""
        kw = {"collate_fn": self.settings["collate_fn"]} if self.settings.get("collate_fn") else {}
        batch = next(iter(DataLoader(Subset(self.dataset, list(indices)), batch_size=len(indices),
                                     shuffle=False, **kw)))
        batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
        rows = next((t.shape[0] for t in batch if isinstance(t, torch.Tensor) and t.dim()), None)
        if rows is not None and rows != len(indices):
            raise ValueError(
                f"the loader gave {rows} rows for the {len(indices)} examples {list(indices)} of "
                "the dataset: an out-of-core store needs one row per example; pass a collate_fn "
                "that keeps every example of a batch"
            )
        return batch

    def first_batch(self, k: int = 1) -> tuple:
        batch = next(iter(self.loader(0, min(k, self.n))))
        return (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)


def _hash_obj(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, np.ndarray):
        h.update(repr((obj.dtype.str, obj.shape)).encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(b"(")
        for x in obj:
            _hash_obj(h, x)
        h.update(b")")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _hash_obj(h, obj[k])
    elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(repr(obj).encode())
    elif callable(getattr(obj, "tobytes", None)):  # PIL images, numpy scalars, ...
        h.update(repr((type(obj).__name__, getattr(obj, "size", None), getattr(obj, "mode", None))).encode())
        h.update(obj.tobytes())
    else:
        try:
            h.update(pickle.dumps(obj, protocol=4))
        except Exception:  # noqa: BLE001 - last resort: the repr, without memory addresses
            h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj)).encode())


#: examples a store's fingerprint samples (its data hash and its function probe)
N_SAMPLE = 16

#: a resumed job's function probe may differ from the store's by this much (relative to the
#: largest output): recomputing on other hardware or thread counts changes the last bits,
#: another function changes far more
PROBE_RTOL = 1e-4


def chunk_size(value: Any, name: str) -> Optional[int]:
    """A user's tile or chunk size as an int, ``None`` for the default; anything else than
    a positive whole number is refused (0 or 2.5 would silently mean something else)."""
    if value is None:
        return None
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < 1:
        raise ValueError(f"{name}={value!r}: a chunk size must be a positive whole number "
                         "(or None for the default)")
    return int(value)


def sample_indices(n: int, n_sample: int = N_SAMPLE) -> list[int]:
    """``n_sample`` example indices spread over ``[0, n)``, first and last included."""
    return sorted(set(np.linspace(0, n - 1, min(n, n_sample)).round().astype(int).tolist())) if n else []


def data_fingerprint(dataset: Any, n_sample: int = N_SAMPLE) -> str:
    """sha256 of the dataset's length and of the examples :func:`sample_indices` picks."""
    n = len(dataset)
    h = hashlib.sha256(f"n={n}".encode())
    for i in sample_indices(n, n_sample):
        h.update(f"[{i}]".encode())
        _hash_obj(h, dataset[i])
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module, layer_collection=None) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes, bytes) and of
    the layers the computation differentiates."""
    from ..dist.fingerprint import parameter_fingerprint

    h = hashlib.sha256(parameter_fingerprint(model).encode())
    buffers = dict(model.named_buffers())
    if buffers:
        h.update(parameter_fingerprint(buffers).encode())
    if layer_collection is not None:
        h.update(repr(layer_collection).encode())
    return h.hexdigest()


def function_probe(function: Callable, source: "DataSource", device: torch.device) -> torch.Tensor:
    """The function's outputs ``(k, c)`` on the examples :func:`sample_indices` picks, in
    float64 on the cpu (also what tells a job its number of outputs c).

    A name cannot tell two lambdas, two closures of one factory, or two architectures with
    the same parameters apart; their outputs on the same examples can. A resumed job
    compares its probe with the store's (:func:`check_probe`)."""
    batch = source.examples(sample_indices(source.n))
    batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
    with torch.no_grad():
        out = function(*batch)
    out = out.unsqueeze(1) if out.dim() == 1 else out
    return out.detach().to(torch.float64).cpu()


def check_probe(stored: Optional[list], requested: Optional[list], where: str) -> None:
    """Raise :class:`StoreMismatchError` when a resumed job's function probe is not the
    store's within :data:`PROBE_RTOL` (a store written without a probe is not checked)."""
    from .layout import StoreMismatchError

    if stored is None or requested is None:
        return
    a, b = np.asarray(stored, dtype=np.float64), np.asarray(requested, dtype=np.float64)
    if a.shape == b.shape:
        both_nan = np.isnan(a) & np.isnan(b)
        scale = max(np.abs(np.where(both_nan, 0, a)).max(initial=0), np.abs(np.where(both_nan, 0, b)).max(initial=0))
        gap = np.abs(np.where(both_nan, 0, a - b)).max(initial=0) / max(scale, np.finfo(np.float64).tiny)
        if not np.isnan(gap) and gap <= PROBE_RTOL:
            return
        what = f"differ by {gap:.3g} relative to the largest"
    else:
        what = f"number {b.size}, the store's {a.size}"
    raise StoreMismatchError(
        f"the store at {where} was computed with another function: its outputs on the "
        f"{N_SAMPLE} sampled examples {what} (tolerance {PROBE_RTOL:g}). Another function or "
        "architecture with the same parameters, or a random model (dropout in training mode: "
        "call model.eval()), cannot resume this store. Pass a new path, or overwrite=True "
        f"(--overwrite) to delete {where} and recompute it."
    )


def function_identity(function: Optional[Callable], function_id: Optional[str] = None) -> str:
    """What identifies the function in a fingerprint: ``function_id`` if given (a user's
    string), ``'model(batch[0])'`` for the default, else ``module.qualname``."""
    if function_id is not None:
        return str(function_id)
    if function is None:
        return "model(batch[0])"
    if isinstance(function, OutputSelection):
        return function_identity(function.function)
    qual = getattr(function, "__qualname__", None) or type(function).__qualname__
    if qual == "default_function.<locals>.function":
        return "model(batch[0])"
    return f"{getattr(function, '__module__', '?')}.{qual}"


# ---------------------------------------------------------------------------------------
# collective start
# ---------------------------------------------------------------------------------------
def _rebuild_error(kind: str, message: str) -> BaseException:
    from .layout import NotAStoreError, StoreMismatchError

    types = {"StoreMismatchError": StoreMismatchError, "NotAStoreError": NotAStoreError,
             "FileExistsError": FileExistsError, "ValueError": ValueError,
             "PermissionError": PermissionError, "FileNotFoundError": FileNotFoundError}
    return types.get(kind, RuntimeError)(message)


def prepare_store(path: Any, spec: StoreSpec, group=None, resume: bool = True, overwrite: bool = False,
                  verify_on_resume: bool = True, storage_options: Optional[dict] = None) -> dict:
    """Rank 0 creates or validates the store; every rank gets the same verdict.

    On resume, rank 0 also recomputes the checksum of every done tile; a tile whose data
    changed since it was written is un-marked (so it is recomputed), with a warning.

    Returns (on every rank): ``{"pending": [tiles not done, row-major], "done_before":
    int, "altered": [tiles found altered], "existed": bool}``. Raises on every rank the
    error rank 0 met (``StoreMismatchError`` for a store of another job, ...).
    """
    from ..dist.errors import on_every_rank
    from ..dist.group import rank, resolve_group, world_size
    from ..dist.reduce import broadcast_object

    group = resolve_group(group)
    verdict: Any = None
    if rank(group) == 0:
        try:
            from .layout import store_exists

            existed = (not overwrite) and store_exists(path, storage_options)
            grp = create_or_validate(path, spec, overwrite=overwrite, resume=resume,
                                     storage_options=storage_options)
            if existed:
                check_probe(dict(grp.attrs.get("meta", {})).get("function_probe"),
                            spec.meta.get("function_probe"), _store_name(path))
            writer = TileWriter(grp)
            altered: list = []
            if existed and verify_on_resume:
                report = verify(grp)
                altered = [tuple(int(i) for i in t) for t in report.changed + report.no_checksum]
                for t in altered:
                    writer._write_marker(t, 0)
                if altered:
                    grp.attrs["complete"] = False
                    log.warning("%d tile(s) of %s no longer match their checksum (altered after "
                                "they were written): they are recomputed: %s",
                                len(altered), path, altered[:10])
            pending = writer.pending_tiles()
            done_before = len(writer.all_tiles()) - len(pending)
            verdict = ("ok", {"pending": pending, "done_before": done_before,
                              "altered": altered, "existed": existed})
        except Exception as e:  # noqa: BLE001 - sent to every rank, re-raised below
            verdict = ("error", type(e).__name__, str(e), e)
    if world_size(group) > 1:
        sendable = None
        if verdict is not None:  # rank 0: the exception object itself stays here
            sendable = verdict[:3] if verdict[0] == "error" else verdict
        got = broadcast_object(sendable, 0, group)
        if rank(group) != 0:
            verdict = got
    if verdict[0] == "error":  # on every rank, from the one verdict
        if len(verdict) == 4:
            raise on_every_rank(verdict[3])
        raise on_every_rank(_rebuild_error(verdict[1], verdict[2] + " (reported by rank 0, which validates the store)"))
    return verdict[1]


def split_contiguous(items: Sequence, rank: int, world: int) -> list:
    """``rank``'s contiguous run of ``items`` (sizes differ by at most one)."""
    from ..dist.sharding import shard_range

    r = shard_range(len(items), rank, world)
    return list(items[r.start:r.stop])


def barrier(group=None) -> None:
    from ..dist.group import resolve_group, world_size

    group = resolve_group(group)
    if world_size(group) > 1:
        torch.distributed.barrier(group=group)


# ---------------------------------------------------------------------------------------
# hooks: tile log, fault injection
# ---------------------------------------------------------------------------------------
class HookedWriter(TileWriter):
    """A TileWriter that can SIGKILL its own process mid-tile (env ``NNGEO_DIST_FAULT_AFTER_TILES``)."""

    def __init__(self, store: Any, storage_options: Optional[dict] = None):
        super().__init__(store, storage_options)
        raw = os.environ.get(FAULT_ENV)
        self.fault_after = int(raw) if raw not in (None, "") else None
        self.tiles_finished = 0

    def _write_checksum(self, index, value):
        if self.fault_after is not None and self.tiles_finished >= self.fault_after:
            log.warning("%s=%d: killing this process mid-tile %s (fault injection)",
                        FAULT_ENV, self.fault_after, tuple(index))
            os.kill(os.getpid(), signal.SIGKILL)
        super()._write_checksum(index, value)

    def finished(self, tile: Sequence[int], tile_log: Optional[str], rank: int) -> None:
        """Count a finished job tile and log it (one appended line ``rank I J``)."""
        self.tiles_finished += 1
        path = tile_log or os.environ.get(TILE_LOG_ENV)
        if path:
            line = f"{rank} " + " ".join(str(int(i)) for i in tile) + "\n"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


class BackgroundWrites:
    """Tile writes on one background thread, overlapping the computation of the next tile.

    ``submit(fn, *args)`` queues a write once fewer than ``depth`` writes are queued or
    running (with the default 1, it waits for the previous write to finish: memory holds
    the tile being computed and the one being written, not a third one waiting between
    them); writes run in submission order. An exception raised by a write (disk
    full, ...) is re-raised in the submitting thread by the next ``submit`` or by ``join``;
    later queued writes are dropped. Compression and file I/O release the GIL, so the write
    of tile k runs while tile k+1 is computed. ``threads=False`` writes synchronously.
    """

    def __init__(self, depth: int = 1, threads: bool = True):
        import queue
        import threading

        self.error: Optional[BaseException] = None
        self.threaded = threads
        if threads:
            self.q: "queue.Queue" = queue.Queue()
            #: writes queued or running (a tile is held until its write returns)
            self.slots = threading.BoundedSemaphore(max(1, depth))
            self.thread = threading.Thread(target=self._run, name="nngeo-tile-writer", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            try:
                if self.error is None:
                    item[0](*item[1])
            except BaseException as e:  # noqa: BLE001 - handed to the submitting thread
                self.error = e
            finally:
                item = None  # the tile's references go before its slot is freed
                self.slots.release()
                self.q.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def submit(self, fn: Callable, *args) -> None:
        if not self.threaded:
            fn(*args)
            return
        self._raise()
        self.slots.acquire()
        if self.error is not None:  # the write that freed the slot failed: give the slot
            self.slots.release()    # back (no write takes it), then report the failure
            self._raise()
        self.q.put((fn, args))

    def join(self) -> None:
        """Wait for every queued write; re-raise the first error."""
        if self.threaded and self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        self._raise()

    def __enter__(self) -> "BackgroundWrites":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.join()
        elif self.threaded and self.thread.is_alive():  # already failing: stop quietly
            self.error = self.error or exc
            self.q.put(None)
            self.thread.join()


def read_tile_log(path: str) -> list[tuple[int, tuple[int, ...]]]:
    """``[(rank, tile), ...]`` from a tile log, in the order written."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            parts = [int(p) for p in line.split()]
            if parts:
                out.append((parts[0], tuple(parts[1:])))
    return out


# ---------------------------------------------------------------------------------------
# progress and report
# ---------------------------------------------------------------------------------------
_job_counter = itertools.count()


class Progress:
    """tqdm bar on rank 0 (stderr): tiles done / total and GB written, over all ranks.

    Other ranks add their counts to the process group's key-value store (one ``add`` per
    tile); rank 0 reads the totals from it when it finishes a tile of its own, and at least
    every ``poll_s`` seconds while it waits at the end. Without a key-value store, rank 0
    shows its own tiles.
    """

    def __init__(self, total: int, initial: int, group=None, enabled: Optional[bool] = None,
                 desc: str = "tiles", unit_bytes: str = "GB"):
        from ..dist.group import rank, resolve_group, world_size

        self.group = resolve_group(group)
        self.rank = rank(self.group)
        self.world = world_size(self.group)
        self.total, self.initial = total, initial
        self.tiles = 0
        self.bytes = 0
        self.kv = None
        self.key = f"nngeo_dist/progress/{next(_job_counter)}"
        if self.world > 1:
            try:
                from torch.distributed import distributed_c10d

                self.kv = distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - progress is best effort
                self.kv = None
        self.bar = None
        if enabled is not False and self.rank == 0:
            try:
                from tqdm.auto import tqdm

                # enabled=None: only on a terminal; True: always (e.g. to a batch job's log)
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="tile", leave=True,
                                dynamic_ncols=True, disable=None if enabled is None else False,
                                mininterval=0.5)
            except ImportError:  # pragma: no cover
                self.bar = None

    def _global(self) -> tuple[int, int]:
        if self.kv is None:
            return self.tiles, self.bytes
        try:
            return int(self.kv.add(self.key + "/tiles", 0)), int(self.kv.add(self.key + "/bytes", 0))
        except Exception:  # noqa: BLE001
            return self.tiles, self.bytes

    def update(self, tiles: int, nbytes: int) -> None:
        self.tiles += tiles
        self.bytes += nbytes
        if self.kv is not None:
            try:
                self.kv.add(self.key + "/tiles", tiles)
                self.kv.add(self.key + "/bytes", nbytes)
            except Exception:  # noqa: BLE001
                self.kv = None
        self._refresh()

    def _refresh(self) -> None:
        if self.bar is None or getattr(self.bar, "disable", False):
            return
        t, b = self._global()
        self.bar.set_postfix_str(f"{b / 1e9:.3f} GB written", refresh=False)
        delta = self.initial + t - self.bar.n
        if delta > 0:
            self.bar.update(delta)  # redraws at most every mininterval

    def close(self) -> None:
        if self.bar is not None:
            self._refresh()
            self.bar.close()


@dataclass
class JobReport:
    """What one build did: ``tiles_total`` job tiles (Gram: ``I <= J``), ``tiles_done_before``
    (found done at start), ``tiles_computed`` (by this process; ``tiles_computed_all``: every
    rank), ``bytes_written`` (this process; ``bytes_written_all``: every rank), seconds,
    ``altered`` tiles found at start and recomputed."""

    path: str
    tiles_total: int = 0
    tiles_done_before: int = 0
    tiles_computed: int = 0
    tiles_computed_all: int = 0
    bytes_written: int = 0
    bytes_written_all: int = 0
    seconds: float = 0.0
    altered: list = field(default_factory=list)
    computed: list = field(default_factory=list)


def all_sum_ints(values: Sequence[int], group=None) -> list[int]:
    """Sum of int lists over the ranks of ``group`` (identity for one process)."""
    from ..dist.group import resolve_group, world_size

    group = resolve_group(group)
    if world_size(group) == 1:
        return list(values)
    from ..dist.agree import all_gather_ints

    rows = all_gather_ints(list(values), group)
    return [int(sum(col)) for col in zip(*rows)]


def now() -> float:
    return time.perf_counter()


def finish_job(writer, report, group, t0: float):
    """Close a tiled job on every rank: rank 0 marks the store complete (a missing tile
    raises on every rank), the per-rank counts are summed, and the time is recorded."""
    from ..dist.errors import collective_errors
    from ..dist.group import rank

    with collective_errors(group):
        if rank(group) == 0:
            writer.mark_complete(strict=True)
    report.tiles_computed_all, report.bytes_written_all = all_sum_ints(
        [report.tiles_computed, report.bytes_written], group)
    barrier(group)
    report.seconds = now() - t0
    return report
