"""Zarr v3 store layouts: opening stores, describing them, creating or validating them.

A *store* is a zarr v3 group (a local directory by default, or any fsspec URL) holding:

- ``data``: the main array. Gram: shape ``(c, n, c, n)``, chunks ``(c, B, c, B)``;
  Jacobian / LowRank: shape ``(c, n, d)``, chunks ``(c, B, D0)``; other kinds: any shape.
- ``tiles_done``: ``uint8`` array over the tile grid, chunks all 1: one marker per tile,
  written *after* the tile's data chunk (see :mod:`nngeo_dist.store.tiles`). Its dimension
  names are the tile axes' names with ``_tile`` appended (Gram ``example_i_tile``, ...).
- ``tiles_checksum``: ``int64`` array over the tile grid, chunks all 1: CRC32 of the tile's
  bytes in the store dtype (``-1`` = none recorded).

A *tile* is exactly one chunk of ``data``. The tile grid runs over the spec's ``tile_axes``
(Gram: axes 1 and 3, the example axes; Jacobian: axes 1 and 2); along the other axes a
chunk spans the whole extent, so a tile index is ``(I, J)`` rather than a full chunk index.

Group attributes (plain JSON) record::

    nngeo_dist_format: 1
    kind, shape, chunks, dtype, tile_axes     the layout
    fingerprint: {str: str}                   what was computed (model, data, function, ...)
    meta: {...}                               representation, variant, n, c, d, library_version
    library_version: str                      version that created the store
    complete: bool                            True once every tile is written

Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import zarr
import zarr.errors

__all__ = [
    "FORMAT_VERSION",
    "OBJECT_ATTR",
    "DATA",
    "TILES_DONE",
    "TILES_CHECKSUM",
    "KINDS",
    "DIM_NAMES",
    "StoreSpec",
    "StoreMismatchError",
    "NotAStoreError",
    "open_store",
    "store_exists",
    "read_spec",
    "create_or_validate",
    "library_version",
    "normalise_dtype",
    "STORE_DTYPES",
]

FORMAT_VERSION = 1
#: Attribute of a group written whole by :func:`nngeo_dist.store.objects.save` (no tiles).
OBJECT_ATTR = "nngeo_dist_object"
DATA = "data"
TILES_DONE = "tiles_done"
TILES_CHECKSUM = "tiles_checksum"

#: Known kinds and their default tile axes (``None``: every axis is a tile axis).
KINDS: dict[str, tuple[int, ...] | None] = {
    "gram": (1, 3),
    "jacobian": (1, 2),
    "lowrank": (1, 2),
    "pmat": None,
    "dense": None,
    "vector": None,
}

#: Dimension names written into the zarr metadata (and used by the xarray view).
DIM_NAMES: dict[str, tuple[str, ...]] = {
    "gram": ("output_a", "example_i", "output_b", "example_j"),
    "jacobian": ("output", "example", "parameter"),
    "lowrank": ("output", "example", "parameter"),
}

#: ``meta`` keys that must agree between a stored and a requested spec (when both set them).
VALIDATED_META = ("representation", "variant", "n", "c", "d")


class StoreMismatchError(ValueError):
    """An existing store was computed with something different from what is requested."""


class NotAStoreError(ValueError):
    """A zarr group exists at the path but was not written by nngeo_dist."""


def library_version() -> str:
    """Version string of nngeo_dist (``'0+unknown'`` if it cannot be determined)."""
    try:
        import nngeo_dist  # local import: avoids a cycle while the package initialises

        v = getattr(nngeo_dist, "__version__", None)
        if v:
            return str(v)
    except Exception:  # pragma: no cover - package half-initialised
        pass
    try:
        from importlib.metadata import version

        return version("nngeo_dist")
    except Exception:
        return "0+unknown"


#: Store dtypes: a tile store holds floating-point numbers that numpy can read back.
STORE_DTYPES = ("float16", "float32", "float64")


def normalise_dtype(dtype: Any) -> str:
    """Canonical store dtype name from a numpy, torch or string dtype.

    Returns one of :data:`STORE_DTYPES` (``'float16'``, ``'float32'``, ``'float64'``);
    ``'float'``, ``'double'``, ``'half'``, ``np.float32``, ``torch.float64`` ... are accepted.

    Raises:
        ValueError: any other dtype (integers would truncate the results; bfloat16 has no
            numpy dtype to store it in).
    """
    s = str(dtype)
    if s.startswith("torch."):  # torch dtypes share numpy's names, bfloat16 aside
        dtype = s = s[len("torch."):]
    try:
        # np.dtype(None) would be float64: no dtype is an error, not a default
        name = None if dtype is None else np.dtype(dtype).name
    except (TypeError, ValueError):  # numpy does not know it (bfloat16, a typo)
        name = None
    if name not in STORE_DTYPES:
        advice = "; store bfloat16 results as float32" if "bfloat16" in s else ""
        raise ValueError(
            f"store dtype {name or s!r} is not supported: a store holds float16, float32 or "
            f"float64. Pass dtype='float32' (or 'float64', 'float16'){advice}"
        )
    return name


def _dtype_name(dtype: Any) -> str:
    """numpy name of an array's dtype, whatever it is (for reporting, not validating)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _is_url(path: str) -> bool:
    return "://" in path


def _local_path(path: Any) -> str | None:
    """Filesystem path for local stores (``file://`` URLs included), else ``None``."""
    s = str(path)
    if s.startswith("file://"):
        return s[len("file://"):]
    if _is_url(s):
        return None
    return s


def _is_local_nonzarr(path: Any) -> bool:
    """True when ``path`` is an existing local file, or a non-empty local directory that is
    not a zarr store (no ``zarr.json``): such a path is never written into nor deleted,
    ``overwrite=True`` (--overwrite) only replaces zarr stores. URLs: always False."""
    if isinstance(path, zarr.Group):
        return False
    s = _local_path(path)
    if s is None or not os.path.exists(s):
        return False
    if not os.path.isdir(s):
        return True
    if os.path.exists(os.path.join(s, "zarr.json")):
        return False
    # zarr writes zarr.json through a temporary "*.partial" file next to it: a directory
    # holding only those is a store another process is creating right now
    return any(not e.endswith(".partial") for e in os.listdir(s))


def _refuse_nonzarr(where: str) -> None:
    raise FileExistsError(
        f"{where} exists and is not a zarr store: it is never written into or deleted (not "
        "even with overwrite=True / --overwrite); choose another path"
    )


def open_store(
    path_or_url: Any,
    mode: str = "r",
    storage_options: dict[str, Any] | None = None,
    attributes: dict[str, Any] | None = None,
) -> zarr.Group:
    """Open a zarr v3 group on a local path or an fsspec URL.

    Args:
        path_or_url: local path (``str`` / ``os.PathLike``), ``file://`` URL (opened as a
            local store, whose writes are atomic), or any fsspec URL (``s3://``,
            ``memory://``, ...). An already opened ``zarr.Group`` is returned as is.
        mode: zarr access mode: ``'r'`` read only, ``'r+'`` read/write (must exist),
            ``'a'`` read/write (create if missing), ``'w'`` create (delete existing
            content), ``'w-'`` create (fail if it exists).
        storage_options: passed to fsspec for URLs.
        attributes: attributes of a group created by this call, written together with the
            group's metadata (one atomic ``zarr.json`` on local stores).

    Raises:
        FileNotFoundError: mode ``'r'``/``'r+'`` and no group exists there.
        FileExistsError: mode ``'w-'`` and a group or array exists there.
        NotAStoreError: a zarr array (not a group) is at ``path_or_url``.
    """
    if isinstance(path_or_url, zarr.Group):
        return path_or_url
    local = _local_path(path_or_url)
    try:
        if local is not None:
            return zarr.open_group(store=local, mode=mode, zarr_format=3, attributes=attributes)
        return zarr.open_group(
            store=str(path_or_url), mode=mode, zarr_format=3, storage_options=storage_options,
            attributes=attributes,
        )
    except zarr.errors.GroupNotFoundError as e:
        raise FileNotFoundError(f"no zarr group found at {path_or_url!s}") from e
    except zarr.errors.ContainsArrayError as e:
        if mode.startswith("w"):
            raise FileExistsError(f"a zarr array already exists at {path_or_url!s}") from e
        raise NotAStoreError(
            f"{path_or_url!s} is a zarr array, not a store (a zarr group); pass the store's "
            "root directory instead"
        ) from e
    except zarr.errors.ContainsGroupError as e:
        raise FileExistsError(f"a zarr group already exists at {path_or_url!s}") from e


def store_exists(path_or_url: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True if a zarr node (group or array) exists at ``path_or_url``."""
    try:
        open_store(path_or_url, "r", storage_options)
        return True
    except NotAStoreError:
        return True  # something (an array) is there
    except FileNotFoundError:
        return False


def _store_name(group_or_path: Any) -> str:
    if isinstance(group_or_path, zarr.Group):
        s = str(group_or_path.store_path)
        return s[len("file://"):] if s.startswith("file://") else s
    return str(group_or_path)


@dataclass
class StoreSpec:
    """What a store holds and how it is laid out.

    Attributes:
        kind: ``'gram'`` (shape ``(c, n, c, n)``), ``'jacobian'`` / ``'lowrank'``
            (``(c, n, d)``), or a generic kind (``'pmat'``, ``'dense'``, ``'vector'``).
        shape: shape of the ``data`` array.
        chunks: chunk shape of ``data``; one chunk is one tile. Along axes that are not
            tile axes the chunk must span the whole extent.
        dtype: numpy dtype name of ``data`` (``'float32'``, ``'float64'``).
        fingerprint: what was computed, as strings (e.g. ``model``, ``data``,
            ``function``, ``tile``, ``dtype``). A resumed run must present the same.
        meta: descriptive metadata (``representation``, ``variant``, ``n``, ``c``, ``d``,
            ``library_version``); keys in :data:`VALIDATED_META` must also agree on resume.
        tile_axes: axes the tile grid runs over; ``None`` picks the kind's default.
    """

    kind: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str = "float64"
    fingerprint: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    tile_axes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.chunks = tuple(int(s) for s in self.chunks)
        self.dtype = normalise_dtype(self.dtype)
        self.fingerprint = {str(k): str(v) for k, v in dict(self.fingerprint).items()}
        self.meta = dict(self.meta)
        if self.kind not in KINDS:
            raise ValueError(f"unknown store kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if len(self.shape) != len(self.chunks):
            raise ValueError(f"shape {self.shape} and chunks {self.chunks} differ in length")
        if any(s < 1 for s in self.shape):
            raise ValueError(f"every dimension of shape {self.shape} must be >= 1")
        if any(ch < 1 for ch in self.chunks):
            raise ValueError(f"every chunk size in {self.chunks} must be >= 1")
        # A chunk larger than the array is clamped: it is the same single chunk.
        self.chunks = tuple(min(ch, s) for ch, s in zip(self.chunks, self.shape))
        if self.tile_axes is None:
            default = KINDS[self.kind]
            self.tile_axes = tuple(range(len(self.shape))) if default is None else default
        self.tile_axes = tuple(int(a) for a in self.tile_axes)
        if any(a < 0 or a >= len(self.shape) for a in self.tile_axes):
            raise ValueError(f"tile_axes {self.tile_axes} out of range for shape {self.shape}")
        for ax in range(len(self.shape)):
            if ax not in self.tile_axes and self.chunks[ax] != self.shape[ax]:
                raise ValueError(
                    f"axis {ax} is not a tile axis, so its chunk must span the whole extent "
                    f"{self.shape[ax]} (got {self.chunks[ax]})"
                )
        if self.kind == "gram":
            if len(self.shape) != 4 or self.shape[0] != self.shape[2] or self.shape[1] != self.shape[3]:
                raise ValueError(f"a Gram store has shape (c, n, c, n), got {self.shape}")
            if self.chunks[1] != self.chunks[3]:
                raise ValueError(f"a Gram store has chunks (c, B, c, B), got {self.chunks}")
        if self.kind in ("jacobian", "lowrank") and len(self.shape) != 3:
            raise ValueError(f"a {self.kind} store has shape (c, n, d), got {self.shape}")

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def gram(
        cls,
        c: int,
        n: int,
        B: int,
        dtype: Any = "float64",
        fingerprint: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> "StoreSpec":
        """Spec of a Gram store: shape ``(c, n, c, n)``, chunks ``(c, B, c, B)``."""
        m = {"representation": "FMatDense", "n": int(n), "c": int(c)}
        m.update(meta or {})
        return cls("gram", (c, n, c, n), (c, B, c, B), dtype, dict(fingerprint or {}), m)

    @classmethod
    def jacobian(
        cls,
        c: int,
        n: int,
        d: int,
        B: int,
        D0: int | None = None,
        dtype: Any = "float64",
        fingerprint: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        kind: str = "jacobian",
    ) -> "StoreSpec":
        """Spec of a Jacobian store: shape ``(c, n, d)``, chunks ``(c, B, D0)`` (D0 = d by default)."""
        m = {"representation": "PushForwardDense", "n": int(n), "c": int(c), "d": int(d)}
        m.update(meta or {})
        return cls(kind, (c, n, d), (c, B, D0 or d), dtype, dict(fingerprint or {}), m)

    # -- derived ----------------------------------------------------------------------
    @property
    def tile_grid(self) -> tuple[int, ...]:
        """Number of tiles along each tile axis (``ceil(shape / chunks)``)."""
        return tuple(math.ceil(self.shape[a] / self.chunks[a]) for a in self.tile_axes)

    @property
    def n_tiles(self) -> int:
        return int(np.prod(self.tile_grid))

    @property
    def dim_names(self) -> tuple[str, ...]:
        """Names of the axes of ``data`` (Gram ``('output_a', 'example_i', ...)``)."""
        return DIM_NAMES.get(self.kind, tuple(f"dim_{i}" for i in range(len(self.shape))))

    @property
    def tile_dim_names(self) -> tuple[str, ...]:
        """Names of the axes of the tile grid (the marker arrays): ``<data axis>_tile`` per
        tile axis, e.g. Gram ``('example_i_tile', 'example_j_tile')``; distinct from the
        data's names, whose sizes differ."""
        names = self.dim_names
        return tuple(f"{names[a]}_tile" for a in self.tile_axes or ())

    def tile_region(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        """Slices of ``data`` covered by tile ``index`` (one int per tile axis).

        Tile ``I`` along a tile axis covers ``[I*B, min((I+1)*B, size))``: the last tile may
        be smaller.
        """
        index = tuple(int(i) for i in index)
        if len(index) != len(self.tile_axes):
            raise IndexError(f"tile index {index} must have {len(self.tile_axes)} entries")
        for i, g in zip(index, self.tile_grid):
            if not 0 <= i < g:
                raise IndexError(f"tile index {index} outside the tile grid {self.tile_grid}")
        region = [slice(0, s) for s in self.shape]
        for i, ax in zip(index, self.tile_axes):
            b = self.chunks[ax]
            region[ax] = slice(i * b, min((i + 1) * b, self.shape[ax]))
        return tuple(region)

    def tile_shape(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the block of tile ``index``."""
        return tuple(s.stop - s.start for s in self.tile_region(index))

    # -- (de)serialisation --------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        """JSON attributes recorded on the group (``complete`` excluded)."""
        return {
            "nngeo_dist_format": FORMAT_VERSION,
            "kind": self.kind,
            "shape": list(self.shape),
            "chunks": list(self.chunks),
            "dtype": self.dtype,
            "tile_axes": list(self.tile_axes or ()),
            "fingerprint": dict(self.fingerprint),
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "StoreSpec":
        """Rebuild the spec recorded in a group's attributes."""
        try:
            return cls(
                kind=attrs["kind"],
                shape=tuple(attrs["shape"]),
                chunks=tuple(attrs["chunks"]),
                dtype=attrs["dtype"],
                fingerprint=dict(attrs.get("fingerprint", {})),
                meta=dict(attrs.get("meta", {})),
                tile_axes=tuple(attrs["tile_axes"]) if "tile_axes" in attrs else None,
            )
        except KeyError as e:
            raise NotAStoreError(f"store attributes lack {e.args[0]!r}") from e

    def differences(self, other: "StoreSpec") -> list[str]:
        """Human-readable list of fields where ``other`` (stored) differs from ``self`` (requested)."""
        diffs: list[str] = []
        for name in ("kind", "shape", "chunks", "dtype", "tile_axes"):
            a, b = getattr(other, name), getattr(self, name)
            if a != b:
                diffs.append(f"{name}: store has {_fmt(a)}, requested {_fmt(b)}")
        for key in sorted(set(self.fingerprint) | set(other.fingerprint)):
            a, b = other.fingerprint.get(key), self.fingerprint.get(key)
            if a != b:
                diffs.append(f"fingerprint[{key!r}]: store has {_fmt(a)}, requested {_fmt(b)}")
        for key in VALIDATED_META:
            if key in self.meta and key in other.meta and _jsonable(self.meta[key]) != _jsonable(other.meta[key]):
                diffs.append(
                    f"meta[{key!r}]: store has {_fmt(other.meta[key])}, requested {_fmt(self.meta[key])}"
                )
        return diffs


def _fmt(v: Any) -> str:
    if v is None:
        return "(missing)"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


def _jsonable(v: Any) -> Any:
    """Tuples to lists, numpy scalars to Python scalars, recursively."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_spec(store: Any, storage_options: dict[str, Any] | None = None) -> StoreSpec:
    """The :class:`StoreSpec` recorded in an existing store (path, URL or group)."""
    return _spec_of(open_store(store, "r", storage_options), _store_name(store))


def _spec_of(group, where: str, advice: str = "") -> StoreSpec:
    """The spec a zarr group records, or :class:`NotAStoreError` if nngeo_dist did not
    write it."""
    attrs = dict(group.attrs)
    if "nngeo_dist_format" not in attrs:
        raise NotAStoreError(
            f"{where} holds a zarr group that was not written by nngeo_dist (no "
            f"'nngeo_dist_format' attribute){advice}"
        )
    return StoreSpec.from_attrs(attrs)


def _ensure_arrays(group: zarr.Group, spec: StoreSpec) -> None:
    """Create ``data``, ``tiles_done`` and ``tiles_checksum`` where missing (idempotent).

    Every array records its ``dimension_names`` (xarray needs them to open a zarr 3 group).
    Stores written before the marker arrays had them still resume: existing arrays are
    kept as they are.
    """
    grid = spec.tile_grid
    marker = dict(shape=grid, chunks=(1,) * len(grid), dimension_names=spec.tile_dim_names)
    todo = [
        # dense floating-point tiles gain ~16% from zstd but take twice as long to write
        (DATA, dict(shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype, fill_value=0,
                    dimension_names=spec.dim_names, compressors=None)),
        (TILES_CHECKSUM, dict(marker, dtype="int64", fill_value=-1)),
        (TILES_DONE, dict(marker, dtype="uint8", fill_value=0)),
    ]
    for name, kw in todo:
        if _has_member(group, name):
            continue
        try:
            group.create_array(name, **kw)
        except zarr.errors.ContainsArrayError:
            pass  # created concurrently by another process: validated below


def _has_member(group: zarr.Group, name: str) -> bool:
    """True if ``group[name]`` exists (no listing: tolerant of concurrent creators)."""
    try:
        group[name]
        return True
    except KeyError:
        return False


def _check_arrays(group: zarr.Group, spec: StoreSpec, where: str) -> None:
    data = group[DATA]
    problems = []
    if tuple(data.shape) != spec.shape:
        problems.append(f"data.shape: store has {_fmt(data.shape)}, attributes say {_fmt(spec.shape)}")
    if tuple(data.chunks) != spec.chunks:
        problems.append(f"data.chunks: store has {_fmt(data.chunks)}, attributes say {_fmt(spec.chunks)}")
    if _dtype_name(data.dtype) != spec.dtype:
        problems.append(f"data.dtype: store has {data.dtype}, attributes say {spec.dtype}")
    if tuple(group[TILES_DONE].shape) != spec.tile_grid:
        problems.append(f"tiles_done.shape: {group[TILES_DONE].shape} != tile grid {spec.tile_grid}")
    if problems:
        raise StoreMismatchError(
            f"the store at {where} is inconsistent with its own attributes:\n  - "
            + "\n  - ".join(problems)
            + "\nPass a new path or overwrite=True (--overwrite) to recompute it."
        )


def create_or_validate(
    path: Any,
    spec: StoreSpec,
    overwrite: bool = False,
    resume: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create a store for ``spec`` at ``path``, or reopen a compatible existing one.

    - No store at ``path``: create the group, the ``data`` array (chunks = ``spec.chunks``),
      the ``tiles_done`` / ``tiles_checksum`` marker arrays, and record the spec,
      fingerprint, library version and ``complete: False`` in the group attributes.
    - ``overwrite=True``: delete the zarr store at ``path`` and create afresh.
    - ``path`` is a local file, or a non-empty directory that is not a zarr store: raise
      ``FileExistsError`` (with or without ``overwrite``: user files are never deleted).
    - Store exists, ``resume=True``: if kind, shape, chunks, dtype, fingerprint (and the
      meta keys ``representation``, ``variant``, ``n``, ``c``, ``d``) agree, reuse it as is
      (tiles already done are kept); otherwise raise :class:`StoreMismatchError` naming each
      field that differs.
    - Store exists, ``resume=False`` and ``overwrite=False``: raise ``FileExistsError``.

    Call it from one process (e.g. rank 0) before writers start, or from all with the same
    spec: creation is idempotent and a concurrent creator is validated against, not clobbered.

    Returns:
        The group, opened read/write.
    """
    where = _store_name(path)
    if _is_local_nonzarr(path):
        _refuse_nonzarr(where)
    if overwrite:
        return _initialise(open_store(path, "w", storage_options, _initial_attrs(spec)), spec)

    if store_exists(path, storage_options):
        if not resume:
            raise FileExistsError(
                f"a store already exists at {where}. Pass --resume (resume=True) to continue "
                "it, or --overwrite (overwrite=True) to delete it and start again, or choose "
                "another path."
            )
        group = open_store(path, "r+", storage_options)
        stored = _spec_of(group, where, ": pass a new path, or overwrite=True (--overwrite) to delete it")
        diffs = spec.differences(stored)
        if diffs:
            raise StoreMismatchError(
                f"the store at {where} was computed with different settings and cannot be "
                "resumed:\n  - " + "\n  - ".join(diffs)
                + f"\nPass a new path, or overwrite=True (--overwrite) to delete {where} and "
                "recompute it."
            )
        return _initialise(group, stored)  # arrays may be missing if creation was interrupted

    try:
        group = open_store(path, "w-", storage_options, _initial_attrs(spec))
    except FileExistsError:
        if not _appears(path, storage_options):
            _refuse_nonzarr(where)  # something that is not a zarr node is there
        # Another process created it between our check and now: validate against it.
        return create_or_validate(path, spec, overwrite=False, resume=True,
                                  storage_options=storage_options)
    return _initialise(group, spec)


#: How long a creator that finds content at a path waits for it to become a zarr group
#: (a concurrent creator's group metadata is one small write: milliseconds).
CONCURRENT_CREATE_WAIT_S = 2.0


def _appears(path: Any, storage_options: dict[str, Any] | None) -> bool:
    """True once a zarr node exists at ``path``, polling up to
    :data:`CONCURRENT_CREATE_WAIT_S` (content that stays non-zarr returns False)."""
    deadline = time.monotonic() + CONCURRENT_CREATE_WAIT_S
    while True:
        if store_exists(path, storage_options):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _initial_attrs(spec: StoreSpec) -> dict[str, Any]:
    """Group attributes of a new store: the spec, library version, ``complete: False``."""
    version = library_version()
    attrs = spec.to_attrs()
    attrs["meta"].setdefault("library_version", version)
    attrs["library_version"] = version
    attrs["complete"] = False
    return attrs


def _initialise(group: zarr.Group, spec: StoreSpec) -> zarr.Group:
    """Create the arrays where missing (idempotent) and check them against ``spec``.

    The group's attributes are written when the group itself is created, in the same
    metadata document, so no process ever sees an nngeo_dist group without its spec.
    """
    _ensure_arrays(group, spec)
    _check_arrays(group, spec, _store_name(group))
    return group
