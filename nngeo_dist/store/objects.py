"""Save and load the library's matrices: any PMat*, FMatDense, PushForwardDense, PullBackDense.

``save(F, path)`` writes ``F`` to a zarr v3 group; ``load(path)`` returns an object ready
for every operation, on any number of ranks. One code path serves every representation:
each class has a small *codec* (:data:`CODECS`) turning it into a :class:`State` (named
tensors + JSON attributes + child objects) and back; the writer and the reader know
nothing else about the classes.

Layout of a store (a zarr v3 group)::

    <array per tensor, named by role>   data | block/<layer> | A/<layer>, G/<layer> |
                                        UA/<layer>, UG/<layer>, D/<layer> |
                                        diag/<layer>, cross/<layer>
    parts/<i>/...                       PMatMixed: one subgroup per part, same layout
    attrs:
      nngeo_dist_object   {format, class, module, layers: [{name, key, kind,
                           weight_shape, bias_shape}], attrs: {class-specific scalars,
                           e.g. PMatLowRank's n}, arrays: {role: {shape, dtype, torch_dtype,
                           row_axis}}, children: [...]}
      representation      the class name
      library_version     the version that wrote it
      fingerprint         {str: str}: what was computed (the CLI records model, data, ...)
      meta                free JSON given by the caller (variant, n, ...)
      complete            False until every array is written; set last

Objects with one ``data`` array also carry the attributes of
:class:`~nngeo_dist.store.layout.StoreSpec` (``nngeo_dist_format``, ``kind``, ``shape``,
``chunks``, ``dtype``, ``tile_axes``), so :func:`nngeo_dist.store.to_dask` /
:func:`~nngeo_dist.store.to_xarray` open them too (Gram: kind ``gram``, chunks
``(c, B, c, B)``; Jacobian / LowRank: kind ``jacobian`` / ``lowrank``, chunks
``(c, B, D0)``; DESIGN.md §4). Every array has zarr v3 ``dimension_names``, so
``xarray.open_zarr(path)`` (or ``group="A"`` for a per-layer family) and plain ``zarr``
read them without this library. Layer names that are not valid zarr node names (the empty
name of a bare module, a leading ``__``) are stored under a key recorded in ``layers``.

Distribution:

- Replicated objects (every rank holds the same numbers): rank 0 writes, the others wait.
- Row-sharded objects (a PMatLowRank / PushForwardDense / FMatDense / PullBackDense whose
  ``group`` holds several ranks; each rank holds its examples' rows along axis 1 of
  ``data``): each rank writes its own rows into one array. Offsets come from one
  all_gather of the row counts; the row chunk size divides every rank's offset, so no two
  ranks ever write the same chunk (zarr is only safe for concurrent writers on distinct
  chunks).
- ``load`` on a group of any size: replicated objects are read whole by every rank; the
  rows of a row-sharded class are split by :func:`~nngeo_dist.dist.sharding.shard_range`
  for the loading group (each rank reads only its rows), or read whole in one process.
- Every rank of the group must call ``save`` / ``load`` (as every operation); a failure
  on one rank (disk full, missing path) raises on every rank instead of hanging.

Objects that hold a generator and a data loader instead of numbers (PMatImplicit,
PushForwardImplicit) cannot be saved: :class:`NotSaveableError`.
"""
from __future__ import annotations

import importlib
import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import zarr
from torch import Tensor

from .layout import (
    FORMAT_VERSION,
    KINDS,
    OBJECT_ATTR,
    NotAStoreError,
    StoreMismatchError,
    _is_local_nonzarr,
    _jsonable,
    _store_name,
    library_version,
    open_store,
    store_exists,
)
from .tiles import IncompleteStoreError, as_numpy

__all__ = [
    "save", "load", "check_output_path", "read_attrs", "is_saved_object",
    "State", "Codec", "CODECS", "register_codec", "NotSaveableError",
    "OBJECT_ATTR",
]

OBJECT_FORMAT = 1
#: Target size of one chunk (bytes, uncompressed).
CHUNK_BYTES = 16 * 2**20


class NotSaveableError(TypeError):
    """The object holds no numbers to store (a generator and a loader), or is unknown."""


# ============================================================================ codecs


@dataclass
class State:
    """What a codec extracts from an object.

    ``arrays``: role -> tensor (``None``: absent, e.g. EKFAC's U_A of an Embedding);
    roles may contain ``/`` (``A/<layer key>``). ``attrs``: JSON scalars of the class.
    ``children``: subgroup name -> object, saved recursively (PMatMixed's parts).
    """

    arrays: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    children: dict = field(default_factory=dict)


@dataclass
class Codec:
    """How one class is saved: ``to_state(obj) -> State`` and
    ``from_state(cls, layer_collection, arrays, attrs, children, group) -> obj``.

    ``kind``: the store kind of its ``data`` array when it is the only array (``gram``,
    ``jacobian``, ``lowrank``, ``pmat``), or None. ``row_axis``: axis of ``data`` along
    which the object may be row-sharded over its ``group`` (None: always replicated).
    ``layers``: whether the object has a ``layer_collection``.
    """

    to_state: Callable[[Any], State]
    from_state: Callable[..., Any]
    kind: Optional[str] = "pmat"
    row_axis: Optional[int] = None
    layers: bool = True


CODECS: "dict[str, Codec]" = {}

#: Classes that hold a generator and a loader instead of numbers.
_NOT_SAVEABLE = {
    "PMatImplicit": "PMatDense, PMatLowRank, PMatDiag or another stored representation",
    "PushForwardImplicit": "PushForwardDense (Jacobian(..., representation=PushForwardDense))",
}


def register_codec(class_name: str, codec: Codec) -> None:
    """Teach save/load a class (by its name; the class is found again by module + name)."""
    CODECS[class_name] = codec


def _layer_key(index: int, name: str) -> str:
    """A zarr node name for layer ``name``: the name itself when valid, else ``_layer<i>``."""
    if name and "/" not in name and not name.startswith("__") and name.strip("."):
        return name
    return f"_layer{index}"


def _keys(lc) -> "list[tuple[str, str]]":
    return [(name, _layer_key(i, name)) for i, name in enumerate(lc.layers)]


def _per_layer(lc, role: str, values: Mapping) -> dict:
    return {f"{role}/{key}": values[name] for name, key in _keys(lc)}


def _from_layers(lc, arrays: Mapping, role: str) -> "OrderedDict":
    return OrderedDict((name, arrays.get(f"{role}/{key}")) for name, key in _keys(lc))


def _construct(cls, *args, group=None, **kw):
    """``cls(*args, **kw)``, passing ``group`` when the constructor takes one."""
    if _takes_group(cls):
        return cls(*args, group=group, **kw)
    return cls(*args, **kw)


def _takes_group(cls) -> bool:
    import inspect

    try:
        return "group" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _dtype_name(dtype) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _torch_dtype(name: Optional[str]):
    return None if name is None else getattr(torch, name)


# --- one codec per class ---------------------------------------------------------------


def _register_builtin_codecs() -> None:
    single = lambda obj: State({"data": obj.data})  # noqa: E731

    register_codec("PMatDense", Codec(single, lambda cls, lc, a, at, ch, g: cls(lc, a["data"])))
    register_codec("PMatDiag", Codec(single, lambda cls, lc, a, at, ch, g: cls(lc, a["data"])))
    register_codec("PMatBlockDiag", Codec(
        lambda F: State(_per_layer(F.layer_collection, "block", F.data)),
        lambda cls, lc, a, at, ch, g: cls(lc, _from_layers(lc, a, "block")),
        kind=None,
    ))
    register_codec("PMatLowRank", Codec(
        lambda F: State({"data": F.data}, {"n": int(F.n)}),
        lambda cls, lc, a, at, ch, g: _construct(cls, lc, a["data"], int(at["n"]), group=g),
        kind="lowrank", row_axis=1,
    ))

    def kfac_state(F):
        lc = F.layer_collection
        return State(
            {**_per_layer(lc, "A", {n: ag[0] for n, ag in F.data.items()}),
             **_per_layer(lc, "G", {n: ag[1] for n, ag in F.data.items()})},
            {"eig_dtype": _dtype_name(getattr(F, "eig_dtype", None))},
        )

    def kfac_from(cls, lc, a, at, ch, g):
        A, G = _from_layers(lc, a, "A"), _from_layers(lc, a, "G")
        return cls(lc, OrderedDict((n, (A[n], G[n])) for n in lc.layers),
                   eig_dtype=_torch_dtype(at.get("eig_dtype")))

    register_codec("PMatKFAC", Codec(kfac_state, kfac_from, kind=None))

    def ekfac_state(F):
        lc = F.layer_collection
        evecs, diags = F.data
        return State({
            **_per_layer(lc, "UA", {n: u[0] for n, u in evecs.items()}),
            **_per_layer(lc, "UG", {n: u[1] for n, u in evecs.items()}),
            **_per_layer(lc, "D", diags),
        })

    def ekfac_from(cls, lc, a, at, ch, g):
        UA, UG, D = (_from_layers(lc, a, r) for r in ("UA", "UG", "D"))
        return cls(lc, OrderedDict((n, (UA[n], UG[n])) for n in lc.layers), D)

    register_codec("PMatEKFAC", Codec(ekfac_state, ekfac_from, kind=None))

    def qd_state(F):
        lc = F.layer_collection
        return State({**_per_layer(lc, "diag", {n: dc[0] for n, dc in F.data.items()}),
                      **_per_layer(lc, "cross", {n: dc[1] for n, dc in F.data.items()})})

    def qd_from(cls, lc, a, at, ch, g):
        d, c = _from_layers(lc, a, "diag"), _from_layers(lc, a, "cross")
        return cls(lc, OrderedDict((n, (d[n], c[n])) for n in lc.layers))

    register_codec("PMatQuasiDiag", Codec(qd_state, qd_from, kind=None))

    def mixed_state(F):
        mapping = None
        if F.mapping is not None:
            mapping = {str(k): _class_ref(v) for k, v in F.mapping.items()}
        return State({}, {"mapping": mapping, "n_parts": len(F.parts)},
                     {f"parts/{i}": p for i, p in enumerate(F.parts)})

    def mixed_from(cls, lc, a, at, ch, g):
        mapping = None
        if at.get("mapping") is not None:
            mapping = {k: _import_class(*v) for k, v in at["mapping"].items()}
        parts = [ch[f"parts/{i}"] for i in range(int(at["n_parts"]))]
        return cls(lc, parts, mapping=mapping)

    register_codec("PMatMixed", Codec(mixed_state, mixed_from, kind=None))

    register_codec("FMatDense", Codec(
        single, lambda cls, lc, a, at, ch, g: _construct(cls, a["data"], group=g),
        kind="gram", row_axis=1, layers=False,
    ))
    for name in ("PushForwardDense", "PullBackDense"):
        register_codec(name, Codec(
            single, lambda cls, lc, a, at, ch, g: _construct(cls, lc, a["data"], group=g),
            kind="jacobian", row_axis=1,
        ))


_register_builtin_codecs()


def _class_ref(cls) -> "list[str]":
    return [cls.__module__, cls.__qualname__]


def _import_class(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        for fallback in ("nngeo_dist.object", "nngeo_dist.object.pspace"):
            cls = getattr(importlib.import_module(fallback), name, None)
            if cls is not None:
                return cls
        raise NotAStoreError(
            f"the store holds a {name} (module {module}), which this version of nngeo_dist "
            f"({library_version()}) does not have; load it with the version that wrote it"
        ) from None


def _codec_for(obj) -> Codec:
    name = type(obj).__name__
    if name in _NOT_SAVEABLE:
        raise NotSaveableError(
            f"{name} cannot be saved: it holds the model and a data loader, not numbers "
            f"(each operation is a pass over the data); build {_NOT_SAVEABLE[name]} to save it"
        )
    codec = CODECS.get(name)
    if codec is None and name.endswith("Stored") and getattr(obj, "path", None):
        raise NotSaveableError(
            f"a {name} already lives in the zarr store at {obj.path}: copy that store (or "
            "open it again with nngeo_dist.load); nothing to save"
        )
    if codec is None:
        raise NotSaveableError(
            f"cannot save a {name}: save/load know {', '.join(sorted(CODECS))}"
        )
    return codec


# ============================================================================ planning


@dataclass
class _Array:
    path: str            # path of the array in the store
    tensor: Optional[Tensor]
    kind: Optional[str]  # chunking rule: gram / jacobian / lowrank / None
    row_axis: Optional[int]  # set when the tensor is row-sharded over the write group
    desc: dict = field(default_factory=dict)


@dataclass
class _Node:
    path: str
    attrs: dict
    arrays: "list[_Array]"
    children: "list[_Node]"


def _layers_attr(lc) -> "list[dict]":
    return [
        {"name": name, "key": key, "kind": lc.layers[name].kind,
         "weight_shape": [int(s) for s in lc.layers[name].weight_shape],
         "bias_shape": None if lc.layers[name].bias_shape is None else [int(s) for s in lc.layers[name].bias_shape]}
        for name, key in _keys(lc)
    ]


def _layers_from_attr(entries) -> Any:
    from ..layercollection import Layer, LayerCollection

    lc = LayerCollection()
    for e in entries:
        bias = None if e["bias_shape"] is None else tuple(int(s) for s in e["bias_shape"])
        lc.add_layer(e["name"], Layer(e["kind"], tuple(int(s) for s in e["weight_shape"]), bias))
    return lc


def _object_group(obj, codec):
    """The group over which ``obj`` is row-sharded (None: replicated)."""
    from ..dist.group import world_size

    if codec.row_axis is None:
        return None
    g = getattr(obj, "group", None)
    if g is None or world_size(g) <= 1:
        return None
    return g


def _plan(obj, path: str = "") -> "tuple[_Node, list]":
    """The tree of nodes to write, and the groups over which arrays are row-sharded."""
    codec = _codec_for(obj)
    state = codec.to_state(obj)
    shard_group = _object_group(obj, codec)
    groups = [shard_group] if shard_group is not None else []
    lc = getattr(obj, "layer_collection", None) if codec.layers else None
    if lc is not None:
        keys = [k for _, k in _keys(lc)]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two layers map to one store key ({keys}); rename a layer")
    arrays, descs = [], {}
    for role, t in state.arrays.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{type(obj).__name__}: {role} is a {type(t).__name__}, not a tensor")
        row_axis = codec.row_axis if (shard_group is not None and role == "data") else None
        a = _Array(_join(path, role), t, codec.kind if role == "data" else None, row_axis)
        arrays.append(a)
        descs[role] = a.desc  # filled in when shapes are known
    children, child_names = [], []
    for name, child in state.children.items():
        node, child_groups = _plan(child, _join(path, name))
        children.append(node)
        child_names.append(name)
        groups += child_groups
    attrs = {
        "format": OBJECT_FORMAT,
        "class": type(obj).__name__,
        "module": type(obj).__module__,
        "layers": None if lc is None else _layers_attr(lc),
        "attrs": _jsonable(state.attrs),
        "arrays": descs,
        "children": child_names,
    }
    return _Node(path, attrs, arrays, children), groups


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _walk(node: _Node):
    yield node
    for c in node.children:
        yield from _walk(c)


# ============================================================================ chunks


def _torch_to_numpy_dtype(t: Tensor) -> "tuple[np.dtype, str]":
    """(numpy dtype the array is stored in, torch dtype name to restore)."""
    name = _dtype_name(t.dtype)
    if t.dtype == torch.bfloat16:
        return np.dtype("float32"), name
    return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype), name


def _row_chunk(n_rows: int, limit: int, min_rows: Optional[int]) -> int:
    """Rows per chunk: at most ``limit`` and, for a row-sharded array, at most the fewest
    rows a (non-empty) rank holds, so that a chunk is shared by at most two ranks."""
    b = min(limit, max(n_rows, 1))
    if min_rows:
        b = min(b, min_rows)
    return max(1, b)


def _auto_chunks(shape, itemsize: int, target: Optional[int] = None) -> "tuple[int, ...]":
    """Whole array, halving the largest axis until a chunk is at most ``target`` bytes."""
    target = target or CHUNK_BYTES
    chunks = [max(1, int(s)) for s in shape]
    while math.prod(chunks) * itemsize > target and max(chunks) > 1:
        i = chunks.index(max(chunks))
        chunks[i] = (chunks[i] + 1) // 2
    return tuple(chunks)


def _chunks_for(shape, kind, itemsize: int, min_rows: Optional[int] = None, target: Optional[int] = None):
    """Chunks of an array: Gram (c, B, c, B), Jacobian / LowRank (c, B, D0) (DESIGN.md §4),
    others about ``target`` bytes (default :data:`CHUNK_BYTES`); ``min_rows``: see
    :func:`_row_chunk`."""
    target = target or CHUNK_BYTES
    if kind == "gram" and len(shape) == 4:
        c, n = shape[0], shape[1]
        limit = max(1, math.isqrt(max(1, target // max(1, c * c * itemsize))))
        B = _row_chunk(n, limit, min_rows)
        return (max(c, 1), B, max(c, 1), B)
    if kind in ("jacobian", "lowrank") and len(shape) == 3:
        c, n, d = shape
        row_bytes = max(1, c * d * itemsize)
        if row_bytes <= target:
            return (max(c, 1), _row_chunk(n, target // row_bytes, min_rows), max(d, 1))
        return (max(c, 1), 1, max(1, min(d, target // max(1, c * itemsize))))
    if min_rows is not None and len(shape) >= 2:  # row-sharded, generic
        row = list(shape)
        row[1] = 1
        chunks = list(_auto_chunks(row, itemsize, target))
        chunks[1] = _row_chunk(shape[1], max(1, target // max(1, math.prod(chunks) * itemsize)), min_rows)
        return tuple(chunks)
    return _auto_chunks(shape, itemsize, target)


_DIMS = {
    "gram": ("output_a", "example_i", "output_b", "example_j"),
    "jacobian": ("output", "example", "parameter"),
    "lowrank": ("output", "example", "parameter"),
}


def _dimension_names(array_path: str, kind: Optional[str], ndim: int, root_class: str):
    if kind in _DIMS and len(_DIMS[kind]) == ndim:
        return _DIMS[kind]
    leaf = array_path.rsplit("/", 1)[-1]
    if array_path.count("/") == 0 and root_class in ("PMatDense", "PMatDiag") and leaf == "data":
        return ("parameter_i", "parameter_j")[:ndim] if ndim == 2 else ("parameter",)
    # unique within the array's group, so that xarray opens the group as one Dataset
    return tuple(f"{leaf}_{i}" for i in range(ndim))


# ============================================================================ save


def _refuse_existing(path, where: str) -> None:
    raise FileExistsError(
        f"{where} already exists. Pass --overwrite (overwrite=True) to replace it, or "
        "--resume to keep it if it holds this same computation, or choose another path"
    )


def _group_rank(group) -> int:
    from ..dist.group import rank

    return rank(group)


def _collective(group):
    from ..dist.errors import collective_errors
    from ..dist.group import world_size

    return collective_errors(group) if group is not None and world_size(group) > 1 else nullcontext()


def save(
    obj,
    path,
    overwrite: bool = False,
    meta: Optional[Mapping] = None,
    group=None,
    fingerprint: Optional[Mapping] = None,
    storage_options: Optional[dict] = None,
) -> str:
    """Write ``obj`` (any PMat*, FMatDense, PushForwardDense, PullBackDense) to a zarr v3
    group at ``path`` (local path or fsspec URL); returns the path.

    ``overwrite``: replace an existing zarr store (a non-zarr file or directory is never
    deleted); otherwise an existing path raises ``FileExistsError``. ``meta``: JSON
    recorded in the ``meta`` attribute. ``fingerprint``: ``{str: str}`` describing what was
    computed (compared by :func:`check_output_path` on resume). ``group``: the process
    group whose rank 0 writes a replicated object (default: the world group when
    initialised); a row-sharded object is written by every rank of its own ``group``.
    Every rank of the group must call it; an error on one rank raises on all.
    """
    from ..dist.agree import all_gather_ints, all_gather_objects, digest
    from ..dist.group import resolve_group, world_size

    root, shard_groups = _plan(obj)
    if any(g is not shard_groups[0] for g in shard_groups):
        raise ValueError("the object's parts are row-sharded over different process groups")
    wgroup = shard_groups[0] if shard_groups else resolve_group(group)
    multi = wgroup is not None and world_size(wgroup) > 1
    me = _group_rank(wgroup) if multi else 0
    arrays = [a for node in _walk(root) for a in node.arrays]

    # 1. every rank holds the same structure; row-sharded arrays: every rank's row offsets
    sharded = [a for a in arrays if a.row_axis is not None]
    starts: "dict[str, list[int]]" = {}
    if multi:
        layout = [(a.path, str(a.tensor.dtype), a.row_axis,
                   tuple(s for i, s in enumerate(a.tensor.shape) if i != a.row_axis)) for a in arrays]
        digests = [g[0] for g in all_gather_ints([digest(layout)], wgroup)]
        if len(set(digests)) > 1:
            layouts = all_gather_objects(layout, wgroup)
            raise ValueError(_layout_mismatch(type(obj).__name__, layouts))
    if multi and sharded:
        gathered = all_gather_ints([int(a.tensor.shape[a.row_axis]) for a in sharded], wgroup)
        for k, a in enumerate(sharded):
            offs = [0]
            for g in gathered:
                offs.append(offs[-1] + g[k])
            starts[a.path] = offs
    for a in arrays:
        np_dtype, tname = _torch_to_numpy_dtype(a.tensor)
        shape = list(a.tensor.shape)
        offs = starts.get(a.path)
        if offs is not None:
            shape[a.row_axis] = offs[-1]
        a.desc.update({
            "shape": shape, "dtype": np_dtype.name, "torch_dtype": tname,
            "row_axis": _row_axis_of(a),
        })
        min_rows = None
        if offs is not None:
            counts = [b - a_ for a_, b in zip(offs, offs[1:]) if b > a_]
            min_rows = min(counts) if counts else 1
        a.desc["chunks"] = list(_chunks_for(shape, a.kind, np_dtype.itemsize, min_rows))

    where = _store_name(path)
    top = _top_attrs(obj, root, meta, fingerprint)

    # 2. rank 0 creates the group (attributes, complete=False) and every array
    with _collective(wgroup if multi else None):
        if me == 0:
            if _is_local_nonzarr(path):
                raise FileExistsError(
                    f"{where} exists and is not a zarr store: it is never deleted; choose "
                    "another path"
                )
            if store_exists(path, storage_options) and not overwrite:
                _refuse_existing(path, where)
            store = open_store(path, "w", storage_options, attributes=top)
            _create_nodes(store, root, root.attrs["class"])

    # 3. every writer writes its part: rank 0 the replicated arrays, each rank its rows.
    # A row chunk holds at most two ranks' rows (see _row_chunk): the chunks a rank fills
    # alone and the head of its first chunk are written first; the tail of its last chunk
    # (shared with the next rank's head) after a barrier. zarr writes a partial chunk by
    # read-modify-write: no two processes ever touch one chunk at the same time.
    for phase in ("body", "tail"):
        with _collective(wgroup if multi else None):
            if me == 0 or sharded:
                store = open_store(path, "r+", storage_options)
                for a in arrays:
                    if a.row_axis is not None:
                        offs = starts[a.path]
                        _write_rows(store[a.path], a.tensor, a.row_axis, offs[me], phase)
                    elif me == 0 and phase == "body":
                        _write(store[a.path], a.tensor)

    # 4. rank 0 marks it complete, last
    with _collective(wgroup if multi else None):
        if me == 0:
            store = open_store(path, "r+", storage_options)
            store.attrs.update({"complete": True})
    return str(path)


def _layout_mismatch(name: str, layouts: list) -> str:
    ref = {p: (dt, ax, sh) for p, dt, ax, sh in layouts[0]}
    diffs = []
    for r, lay in enumerate(layouts[1:], start=1):
        mine = {p: (dt, ax, sh) for p, dt, ax, sh in lay}
        for p in sorted(set(ref) | set(mine)):
            if ref.get(p) != mine.get(p):
                diffs.append(f"{p}: rank 0 {_fmt_layout(ref.get(p))}, rank {r} {_fmt_layout(mine.get(p))}")
    return (
        f"cannot save this {name}: the ranks hold objects of different shapes ("
        + "; ".join(diffs[:6]) + "). Every rank must hold the same object; an object whose "
        "rows are spread over the ranks must carry its process group (group=...) to be saved "
        "as one row-sharded store"
    )


def _fmt_layout(entry) -> str:
    if entry is None:
        return "missing"
    dt, ax, sh = entry
    what = f"shape {tuple(sh)}" if ax is None else f"rows of shape {tuple(sh)}"
    return f"{what} {dt.replace('torch.', '')}"


def _row_axis_of(a: _Array) -> Optional[int]:
    """The axis along which a loader may split this array (row-shardable classes' data)."""
    return a.row_axis if a.row_axis is not None else _ROW_AXIS_BY_KIND.get(a.kind)


_ROW_AXIS_BY_KIND = {"gram": 1, "jacobian": 1, "lowrank": 1}


def _top_attrs(obj, root: _Node, meta, fingerprint) -> dict:
    version = library_version()
    attrs = {
        OBJECT_ATTR: root.attrs,
        "representation": type(obj).__name__,
        "library_version": version,
        "fingerprint": {str(k): str(v) for k, v in dict(fingerprint or {}).items()},
        "meta": _json_meta(meta),
        "complete": False,
    }
    lc = getattr(obj, "layer_collection", None)
    if lc is not None:
        attrs["meta"].setdefault("d", int(lc.numel()))
    attrs["meta"].setdefault("representation", type(obj).__name__)
    attrs["meta"].setdefault("library_version", version)
    # StoreSpec-compatible attributes for a single `data` array (to_dask / to_xarray)
    if [a.path for a in root.arrays] == ["data"] and not root.children:
        a = root.arrays[0]
        kind = CODECS[root.attrs["class"]].kind or "pmat"
        if kind not in KINDS:
            kind = "pmat"
        shape = a.desc["shape"]
        if kind in ("gram", "jacobian", "lowrank"):
            attrs["meta"].setdefault("c", shape[0])
            attrs["meta"].setdefault("n", shape[1])
        if all(s >= 1 for s in shape):
            tile_axes = KINDS[kind]
            attrs.update({
                "nngeo_dist_format": FORMAT_VERSION,
                "kind": kind,
                "shape": list(shape),
                "chunks": [min(c, s) for c, s in zip(a.desc["chunks"], shape)],
                "dtype": a.desc["dtype"],
                "tile_axes": list(range(len(shape)) if tile_axes is None else tile_axes),
            })
    return attrs


def _json_meta(meta) -> dict:
    import json

    out = {}
    for k, v in dict(meta or {}).items():
        v = _jsonable(v)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[str(k)] = v
    return out


def _create_nodes(store: zarr.Group, node: _Node, root_class: str) -> None:
    if node.path:
        store.require_group(node.path).attrs.update({OBJECT_ATTR: node.attrs})
    for a in node.arrays:
        d = a.desc
        store.create_array(
            a.path, shape=tuple(d["shape"]), chunks=tuple(max(1, c) for c in d["chunks"]),
            dtype=d["dtype"], fill_value=0,
            dimension_names=_dimension_names(a.path[len(node.path) + 1:] if node.path else a.path,
                                             a.kind, len(d["shape"]), root_class if not node.path else ""),
            attributes={"torch_dtype": d["torch_dtype"], "role": a.path[len(node.path) + 1:] if node.path else a.path},
        )
    for child in node.children:
        _create_nodes(store, child, root_class)


def _numpy(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(as_numpy(t))


def _write(arr: zarr.Array, t: Tensor) -> None:
    x = _numpy(t)
    if x.size:
        arr[...] = x


def _write_rows(arr: zarr.Array, t: Tensor, axis: int, start: int, phase: str) -> None:
    """Write rows ``[start, start + rows)`` of ``arr`` along ``axis``: in phase ``body``
    every row but those of a last chunk this rank shares with the next rank; in phase
    ``tail`` those."""
    rows = t.shape[axis]
    if rows == 0:
        return
    B, end, n = arr.chunks[axis], start + rows, arr.shape[axis]
    split = end if end == n or end % B == 0 else max(start, (end // B) * B)
    lo, hi = (start, split) if phase == "body" else (split, end)
    if hi <= lo:
        return
    x = _numpy(t.narrow(axis, lo - start, hi - lo))
    region = [slice(None)] * x.ndim
    region[axis] = slice(lo, hi)
    arr[tuple(region)] = x


# ============================================================================ load


def read_attrs(path, storage_options: Optional[dict] = None) -> dict:
    """The attributes of a saved object's store (``nngeo_dist_object``, ``meta``, ...)."""
    return dict(open_store(path, "r", storage_options).attrs)


def is_saved_object(path, storage_options: Optional[dict] = None) -> bool:
    try:
        return OBJECT_ATTR in read_attrs(path, storage_options)
    except (FileNotFoundError, NotAStoreError):
        return False


def load(path, group=None, device=None, storage_options: Optional[dict] = None):
    """The object saved at ``path``, ready for every operation.

    ``group``: the process group it is loaded on (default: the world group when
    initialised, else one process). Replicated objects are read whole on every rank; a
    row-sharded class (PMatLowRank, PushForwardDense, PullBackDense, FMatDense) gets, on
    each rank, the rows :func:`~nngeo_dist.dist.sharding.shard_range` gives it, whatever
    the world size that saved it. Tensors land on ``device`` (default: cpu). A store written
    tile by tile (``GramMatrix(..., store=...)``, Jacobian / low-rank stores) opens as its
    store-backed object (FMatStored, ...: out of core, nothing loaded).

    Raises:
        FileNotFoundError: nothing at ``path``.
        NotAStoreError: a zarr group not written by :func:`save`.
        IncompleteStoreError: the writer did not finish (no ``complete`` flag).
    """
    from ..dist.group import resolve_group, world_size

    g = resolve_group(group)
    with _collective(g if g is not None and world_size(g) > 1 else None):
        return _load_local(path, g, device, storage_options)


def _load_local(path, group, device, storage_options):
    where = _store_name(path)
    store = open_store(path, "r", storage_options)
    attrs = dict(store.attrs)
    if OBJECT_ATTR not in attrs:
        if attrs.get("nngeo_dist_format") is not None and attrs.get("kind") in ("gram", "jacobian", "lowrank"):
            return _load_tile_store(path, attrs, where, device, storage_options)
        raise NotAStoreError(
            f"{where} is a zarr group but holds no saved nngeo_dist object (no "
            f"'{OBJECT_ATTR}' attribute); open its arrays with zarr, or "
            "nngeo_dist.store.to_xarray for a Gram/Jacobian store"
        )
    if not attrs.get("complete", False):
        raise IncompleteStoreError(
            f"{where} is incomplete: the process that saved it did not finish (no "
            "'complete' flag). Save it again (--overwrite), or rerun the job with --resume"
        )
    return _read_node(store, "", attrs[OBJECT_ATTR], group, device)


def _read_node(store: zarr.Group, path: str, desc: dict, group, device):
    from ..dist.group import rank, world_size
    from ..dist.sharding import shard_range

    if desc.get("format", 1) > OBJECT_FORMAT:
        raise NotAStoreError(
            f"the store was written in object format {desc['format']}, newer than this "
            f"version of nngeo_dist reads ({OBJECT_FORMAT}); upgrade nngeo_dist"
        )
    cls = _import_class(desc["module"], desc["class"])
    lc = None if desc.get("layers") is None else _layers_from_attr(desc["layers"])
    shard = _takes_group(cls) and desc["class"] in CODECS and CODECS[desc["class"]].row_axis is not None
    r, w = rank(group), world_size(group)
    arrays = {}
    for role, info in desc["arrays"].items():
        arr = store[_join(path, role)]
        region = [slice(None)] * len(arr.shape)
        axis = info.get("row_axis")
        if shard and axis is not None and w > 1:
            rows = shard_range(arr.shape[axis], r, w)
            region[axis] = slice(rows.start, rows.stop)
        x = np.asarray(arr[tuple(region)]) if arr.ndim else np.asarray(arr[()])
        t = torch.from_numpy(np.ascontiguousarray(x))
        tdt = _torch_dtype(info.get("torch_dtype") or arr.attrs.get("torch_dtype"))
        if tdt is not None and t.dtype != tdt:
            t = t.to(tdt)
        arrays[role] = t.to(device) if device is not None else t
    children = {name: _read_node(store, _join(path, name), dict(store[_join(path, name)].attrs)[OBJECT_ATTR], group, device)
                for name in desc.get("children", [])}
    codec = CODECS.get(desc["class"])
    if codec is None:
        raise NotAStoreError(f"no codec for {desc['class']}: this version cannot load it")
    return codec.from_state(cls, lc, arrays, desc.get("attrs", {}), children, group if shard else None)


def _load_tile_store(path, attrs, where, device, storage_options):
    """The store-backed object of a store written tile by tile (no saved object in it):
    FMatStored / PushForwardStored / PMatLowRankStored, operated on out of core."""
    try:
        from ..object.stored import open_stored
    except ImportError:  # pragma: no cover - an installation without store-backed objects
        open_stored = None
    layers = (attrs.get("meta") or {}).get("layers")
    lc = _layers_from_attr(layers) if isinstance(layers, list) else None
    if open_stored is not None:
        try:
            return open_stored(path, layer_collection=lc, storage_options=storage_options)
        except ValueError as e:
            raise NotAStoreError(f"{where}: {e}") from e
    if attrs.get("kind") != "gram":
        raise NotAStoreError(f"{where} holds a {attrs.get('kind')!r} store this installation cannot open")
    from ..object import FMatDense
    from .views import check_complete

    check_complete(path, storage_options)
    x = np.asarray(open_store(path, "r", storage_options)["data"][...])
    return FMatDense(torch.from_numpy(x).to(device or "cpu"))


# ============================================================================ output paths


def _check_output_local(path, overwrite, resume, fingerprint, storage_options) -> str:
    where = _store_name(path)
    if _is_local_nonzarr(path):
        raise FileExistsError(
            f"{where} exists and is not a zarr store; it is never overwritten: choose another "
            "--out"
        )
    if not store_exists(path, storage_options):
        return "new"
    if overwrite:
        return "overwrite"
    if not resume:
        _refuse_existing(path, where)
    try:
        attrs = read_attrs(path, storage_options)
    except NotAStoreError:
        attrs = {}
    if OBJECT_ATTR not in attrs:
        raise NotAStoreError(
            f"{where} holds a zarr node that nngeo_dist did not save: --resume cannot use it. "
            "Pass --overwrite to replace it, or choose another --out"
        )
    if fingerprint is not None:
        stored = attrs.get("fingerprint", {}) or {}
        wanted = {str(k): str(v) for k, v in dict(fingerprint).items()}
        diffs = [
            f"{k}: store has {stored.get(k, '(missing)')!r}, requested {wanted.get(k, '(missing)')!r}"
            for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)
        ]
        if diffs:
            raise StoreMismatchError(
                f"{where} holds a different computation and cannot be resumed: "
                + "; ".join(diffs) + ". Pass --overwrite to replace it, or choose another --out"
            )
    return "done" if attrs.get("complete", False) else "resume"


def check_output_path(
    path,
    overwrite: bool = False,
    resume: bool = False,
    group=None,
    fingerprint: Optional[Mapping] = None,
    storage_options: Optional[dict] = None,
) -> str:
    """Decide what to do with an output path; the same answer (or error) on every rank.

    Returns ``"new"`` (nothing there), ``"overwrite"`` (a zarr store there, ``overwrite``),
    ``"done"`` (``resume``, and a complete store of the same ``fingerprint`` is there:
    nothing to compute) or ``"resume"`` (``resume``, an incomplete one: compute again).

    Raises (on every rank of ``group``): ``FileExistsError`` for an existing store without
    ``overwrite`` / ``resume`` (the message names both flags) or for a path that is not a
    zarr store (never deleted); ``StoreMismatchError`` when ``resume`` finds a store of
    another ``fingerprint``; ``NotAStoreError`` when it finds a foreign zarr node. Checked
    on rank 0 only; the outcome is broadcast, so every rank raises the same error.
    """
    from ..dist.group import resolve_group, world_size
    from ..dist.reduce import broadcast_object

    g = resolve_group(group)
    multi = g is not None and world_size(g) > 1
    outcome: Any = None
    error: Optional[BaseException] = None
    if not multi or _group_rank(g) == 0:
        try:
            outcome = ("ok", _check_output_local(path, overwrite, resume, fingerprint, storage_options))
        except Exception as e:  # noqa: BLE001 - shared with every rank below
            error = e
            outcome = ("error", type(e).__module__, type(e).__qualname__, str(e))
    if multi:
        outcome = broadcast_object(outcome, 0, g)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise _rebuild_error(*outcome[1:])
    return outcome[1]


def _rebuild_error(module: str, qualname: str, message: str) -> BaseException:
    try:
        cls = getattr(importlib.import_module(module), qualname)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception:  # noqa: BLE001 - fall back to a plain error with the same text
        pass
    return RuntimeError(message)
