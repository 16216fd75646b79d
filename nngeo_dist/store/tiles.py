"""Resumable, concurrent tile writing with per-tile completion markers and checksums.

Protocol for one tile (one chunk of ``data``), all by the single worker that computed it:

1. if the tile was marked done before (a deliberate rewrite), clear its marker first;
2. write the data chunk (zarr's local store writes a chunk to a temporary file and renames
   it, so a chunk is either old or new, never torn);
3. write the tile's CRC32 into ``tiles_checksum`` (its own 1-element chunk);
4. write ``1`` into ``tiles_done`` (its own 1-element chunk).

Each writer touches only its own chunks, so any number of processes may write distinct
tiles concurrently (zarr is safe for concurrent writers on distinct chunks, not on the same
chunk). A writer killed at any point leaves its tile unmarked; the marker is the only thing
that says a tile is done, and it is written last, so a marked tile is always fully written.

For a Gram store (tile grid over the example axes), :func:`write_gram_tile` writes block
``(I, J)`` and its transpose at ``(J, I)``, marking ``(J, I)`` before ``(I, J)``: a done
marker on ``(I, J)`` with ``I <= J`` therefore implies both halves are on disk.

A writer killed inside a chunk write can leave a stray ``<chunk>.<uuid>.partial`` temporary
file next to the chunk on a local store; zarr never reads it, and it is harmless.

Marker arrays hold one tiny chunk (file/object) per tile: ``(n/B)^2`` of them for a Gram.

Checksums are CRC32 (``zlib.crc32``) of the tile's C-ordered bytes in the store dtype;
:func:`verify` recomputes them for every done tile to detect data altered after writing.
"""

from __future__ import annotations

import errno
import itertools
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import zarr

from .layout import (
    DATA,
    OBJECT_ATTR,
    TILES_CHECKSUM,
    TILES_DONE,
    NotAStoreError,
    StoreSpec,
    _has_member,
    _store_name,
    open_store,
    read_spec,
)

__all__ = [
    "StoreDiskFullError",
    "IncompleteStoreError",
    "TileWriter",
    "VerifyReport",
    "as_numpy",
    "gram_tiles",
    "grid_tiles",
    "tile_checksum",
    "write_gram_tile",
    "verify",
    "missing_tiles",
]

_DISK_FULL_ERRNOS = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())


class StoreDiskFullError(OSError):
    """The disk (or quota) filled up while writing a tile; completed tiles stay valid."""


class IncompleteStoreError(RuntimeError):
    """The store still has tiles that are not written."""


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy view/copy of ``x`` (numpy array, torch tensor on any device, dask array, list);
    a bfloat16 tensor (numpy has no such dtype) comes as float32, exactly."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    elif hasattr(x, "compute") and not isinstance(x, np.ndarray):  # dask
        x = x.compute()
    return np.asarray(x, dtype=dtype)


def tile_checksum(block: np.ndarray) -> int:
    """CRC32 of the C-ordered bytes of ``block`` (as a non-negative int)."""
    return zlib.crc32(np.ascontiguousarray(block).data) & 0xFFFFFFFF


def grid_tiles(grid: Sequence[int]) -> list[tuple[int, ...]]:
    """Every tile index of a grid, in C order."""
    return [tuple(t) for t in itertools.product(*(range(g) for g in grid))]


def gram_tiles(n: int, B: int) -> list[tuple[int, int]]:
    """Tiles ``(I, J)`` with ``I <= J`` of an ``n x n`` example grid cut in blocks of ``B``.

    Tile ``(I, J)`` covers examples ``[I*B, min((I+1)*B, n)) x [J*B, min((J+1)*B, n))``;
    the last row/column of tiles is smaller when ``B`` does not divide ``n``. The other
    half of the Gram tensor follows by symmetry (see :func:`write_gram_tile`).
    """
    if n < 1 or B < 1:
        raise ValueError(f"n and B must be >= 1 (got n={n}, B={B})")
    T = -(-n // B)
    return [(i, j) for i in range(T) for j in range(i, T)]


def _find_disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in ``exc``'s chain / exception group, if any."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return e
        stack.extend(getattr(e, "exceptions", ()) or ())
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                stack.append(nxt)
    return None


class TileWriter:
    """Write tiles of a store, one chunk each, with checksum and done marker.

    Args:
        store: path, fsspec URL, or an open ``zarr.Group`` of a store made by
            :func:`~nngeo_dist.store.layout.create_or_validate`.
        storage_options: fsspec options for URLs.

    Tile indices have one entry per tile axis of the spec (Gram: ``(I, J)`` over examples;
    Jacobian: ``(I, K)`` over examples and parameter chunks).
    """

    def __init__(self, store: Any, storage_options: dict[str, Any] | None = None) -> None:
        self.group: zarr.Group = open_store(store, "r+", storage_options)
        self.spec: StoreSpec = read_spec(self.group)
        self.path: str = _store_name(store)
        self.data = self.group[DATA]
        self.done_arr = self.group[TILES_DONE]
        self.checksum_arr = self.group[TILES_CHECKSUM]

    # -- geometry ---------------------------------------------------------------------
    def tile_region(self, index: Sequence[int]) -> tuple[slice, ...]:
        """Slices of ``data`` covered by tile ``index``."""
        return self.spec.tile_region(tuple(index))

    def tile_shape(self, index: Sequence[int]) -> tuple[int, ...]:
        """Shape of the block of tile ``index``."""
        return self.spec.tile_shape(tuple(index))

    def all_tiles(self) -> list[tuple[int, ...]]:
        """Tiles a job must compute: ``gram_tiles`` (``I <= J``) for a Gram, else the whole grid."""
        if self.spec.kind == "gram":
            return gram_tiles(self.spec.shape[1], self.spec.chunks[1])
        return grid_tiles(self.spec.tile_grid)

    # -- writing ----------------------------------------------------------------------
    def write_tile(self, index: Sequence[int], array: Any) -> None:
        """Write ``array`` as tile ``index``: data chunk, then checksum, then done marker.

        Args:
            index: tile index (one int per tile axis).
            array: block of shape ``tile_shape(index)`` (numpy, torch or dask); cast to the
                store dtype.

        Raises:
            ValueError: wrong block shape.
            StoreDiskFullError: the disk is full; completed tiles stay valid, resume later.
        """
        index = tuple(int(i) for i in index)
        region = self.tile_region(index)
        block = as_numpy(array, dtype=self.spec.dtype)
        expected = tuple(s.stop - s.start for s in region)
        if block.shape != expected:
            raise ValueError(
                f"tile {index} of {self.path} has shape {expected}, got a block of shape {block.shape}"
            )
        block = np.ascontiguousarray(block)
        try:
            if self.is_done(index):
                self._write_marker(index, 0)
            self._write_data(region, block)
            self._write_checksum(index, tile_checksum(block))
            self._write_marker(index, 1)
        except Exception as e:
            full = _find_disk_full(e)
            if full is None:
                raise
            raise StoreDiskFullError(
                full.errno,
                f"disk full while writing tile {index} to the store at {self.path} "
                f"({full.strerror or full}). Tiles already marked done stay valid: free some "
                "space (or move the store) and rerun with --resume (resume=True) to compute "
                "only the remaining tiles.",
            ) from e

    def _write_data(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        self.data[region] = block

    def _write_checksum(self, index: tuple[int, ...], value: int) -> None:
        self.checksum_arr[index] = np.int64(value)

    def _write_marker(self, index: tuple[int, ...], value: int) -> None:
        self.done_arr[index] = np.uint8(value)

    # -- state ------------------------------------------------------------------------
    def is_done(self, index: Sequence[int]) -> bool:
        """True if tile ``index`` is marked done (reads one marker chunk)."""
        return bool(self.done_arr[tuple(int(i) for i in index)])

    def done_mask(self) -> np.ndarray:
        """Boolean array over the tile grid: True where a tile is marked done."""
        return np.asarray(self.done_arr[...]).astype(bool)

    def done_tiles(self) -> set[tuple[int, ...]]:
        """Set of tile indices marked done (whole grid, both Gram halves included)."""
        return {tuple(int(i) for i in ix) for ix in np.argwhere(self.done_mask())}

    def pending_tiles(self, all_tiles: Iterable[Sequence[int]] | None = None) -> list[tuple[int, ...]]:
        """Tiles of ``all_tiles`` (default :meth:`all_tiles`) not yet done, in the given order.

        For a Gram store a tile ``(I, J)`` is pending unless both ``(I, J)`` and ``(J, I)``
        are marked done.
        """
        mask = self.done_mask()
        tiles = self.all_tiles() if all_tiles is None else [tuple(int(i) for i in t) for t in all_tiles]
        gram = self.spec.kind == "gram"
        out = []
        for t in tiles:
            ok = bool(mask[t])
            if gram and ok:
                ok = bool(mask[t[::-1]])
            if not ok:
                out.append(t)
        return out

    def n_missing(self) -> int:
        """Number of grid tiles not marked done (Gram: both halves counted)."""
        return int((~self.done_mask()).sum())

    def mark_complete(self, strict: bool = True) -> bool:
        """Set the group attribute ``complete = True`` if every tile of the grid is done.

        Args:
            strict: raise :class:`IncompleteStoreError` if tiles are missing (else return False).

        Returns:
            True if the store is now marked complete.
        """
        missing = self.n_missing()
        if missing:
            if strict:
                raise IncompleteStoreError(
                    f"cannot mark {self.path} complete: {missing} of {self.spec.n_tiles} tiles "
                    "are not written yet"
                )
            return False
        self.group.attrs["complete"] = True
        return True


def write_gram_tile(writer: TileWriter, I: int, J: int, block: Any) -> None:
    """Write Gram block ``K[:, I-tile, :, J-tile]`` and, if ``I != J``, its transpose.

    Args:
        writer: a :class:`TileWriter` on a Gram store (shape ``(c, n, c, n)``).
        I, J: tile indices (usually ``I <= J``, from :func:`gram_tiles`).
        block: array of shape ``(c, bI, c, bJ)`` with ``block[a, i, b, j] = K[a, I*B+i, b, J*B+j]``.

    The transposed block ``block.transpose(2, 3, 0, 1)`` goes to tile ``(J, I)``, written and
    marked *before* ``(I, J)``, so a done marker on ``(I, J)`` implies both are on disk.
    """
    if writer.spec.kind != "gram":
        raise ValueError(f"write_gram_tile needs a Gram store, {writer.path} is a {writer.spec.kind!r} store")
    block = as_numpy(block)
    if I != J:
        writer.write_tile((J, I), np.ascontiguousarray(block.transpose(2, 3, 0, 1)))
    writer.write_tile((I, J), block)


@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        path: the store.
        n_checked: done tiles whose checksum was recomputed.
        changed: done tiles whose data no longer match the recorded checksum (or no longer
            decode).
        no_checksum: done tiles without a recorded checksum.
        n_missing: tiles not marked done.
    """

    path: str
    n_checked: int = 0
    changed: list[tuple[int, ...]] = field(default_factory=list)
    no_checksum: list[tuple[int, ...]] = field(default_factory=list)
    n_missing: int = 0

    @property
    def ok(self) -> bool:
        """True if every done tile matches its checksum."""
        return not self.changed and not self.no_checksum

    def __str__(self) -> str:
        s = f"{self.path}: {self.n_checked} done tiles checked, {self.n_missing} not written"
        if self.changed:
            s += f"; data changed since written in {len(self.changed)} tile(s): {self.changed[:10]}"
            s += "..." if len(self.changed) > 10 else ""
        if self.no_checksum:
            s += f"; {len(self.no_checksum)} done tile(s) without checksum: {self.no_checksum[:10]}"
        if self.ok:
            s += "; all checksums match"
        return s


def verify(
    store: Any,
    tiles: Iterable[Sequence[int]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> VerifyReport:
    """Recompute the checksum of every done tile (or of ``tiles``) and report mismatches.

    Reads one tile at a time (memory: one chunk). A tile store whose marker arrays were
    never created (creation interrupted) reports every tile missing.

    Raises:
        NotAStoreError: the group holds an object saved whole by
            :func:`~nngeo_dist.store.objects.save` (no per-tile checksums to verify), or
            was not written by nngeo_dist.
    """
    group = open_store(store, "r", storage_options)
    spec = read_spec(group)
    where = _store_name(store)
    if not _has_member(group, TILES_DONE):
        if _saved_whole(group):
            raise NotAStoreError(
                f"{where} holds an object saved whole by save(), not a store written tile by "
                "tile: it records no per-tile checksums, so there is nothing to verify. Load "
                "it with nngeo_dist.load, or open it with to_dask / to_xarray"
            )
        return VerifyReport(path=where, n_missing=spec.n_tiles)
    data, done, sums = group[DATA], group[TILES_DONE], group[TILES_CHECKSUM]
    mask = np.asarray(done[...]).astype(bool)
    recorded = np.asarray(sums[...])
    report = VerifyReport(path=where, n_missing=int((~mask).sum()))
    todo = grid_tiles(spec.tile_grid) if tiles is None else [tuple(int(i) for i in t) for t in tiles]
    for t in todo:
        if not mask[t]:
            continue
        if recorded[t] < 0:
            report.no_checksum.append(t)
            continue
        report.n_checked += 1
        try:
            block = np.asarray(data[spec.tile_region(t)])
        except Exception:  # chunk bytes no longer decode: altered too
            report.changed.append(t)
            continue
        if tile_checksum(block) != int(recorded[t]):
            report.changed.append(t)
    return report


def _saved_whole(group: zarr.Group) -> bool:
    """True for a group written whole by :func:`~nngeo_dist.store.objects.save`: it has no
    tile markers, its ``complete`` attribute is its only record of completion."""
    return OBJECT_ATTR in group.attrs


def missing_tiles(store: Any, storage_options: dict[str, Any] | None = None) -> int:
    """Number of tiles of the grid not marked done (0 for a finished store).

    A group without marker arrays (an object saved whole by
    :func:`~nngeo_dist.store.objects.save`, or a tile store whose creation was
    interrupted) counts 0 when its ``complete`` attribute is set, else every tile: nothing
    records which of its chunks were written.
    """
    group = open_store(store, "r", storage_options)
    if _has_member(group, TILES_DONE):
        return int((np.asarray(group[TILES_DONE][...]) == 0).sum())
    if bool(group.attrs.get("complete", False)):
        return 0
    return read_spec(group).n_tiles
