"""Read-only views of a store: dask arrays and labelled xarray DataArrays.

Both views are lazy: nothing is read until computed, and dask reads the store chunk by
chunk (one chunk = one tile). Incomplete stores are refused unless ``allow_incomplete=True``
(tiles not yet written then read as 0, the fill value).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np

from .layout import DATA, StoreSpec, _store_name, open_store, read_spec
from .tiles import IncompleteStoreError, _saved_whole, missing_tiles

__all__ = ["to_dask", "to_xarray", "check_complete", "is_complete"]


def is_complete(store: Any, storage_options: dict[str, Any] | None = None) -> bool:
    """True if the store's ``complete`` attribute is set or every tile is marked done."""
    group = open_store(store, "r", storage_options)
    if bool(group.attrs.get("complete", False)):
        return True
    return missing_tiles(group) == 0


def check_complete(store: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Raise :class:`~nngeo_dist.store.tiles.IncompleteStoreError` if tiles are missing."""
    group = open_store(store, "r", storage_options)
    if bool(group.attrs.get("complete", False)):
        return
    missing = missing_tiles(group)
    if missing and _saved_whole(group):
        raise IncompleteStoreError(
            f"the object saved at {_store_name(store)} is incomplete: the process that saved "
            "it did not finish (no 'complete' flag). Save it again (overwrite=True, "
            "--overwrite), or pass allow_incomplete=True to read it anyway (unwritten chunks "
            "read as 0)."
        )
    if missing:
        spec = read_spec(group)
        raise IncompleteStoreError(
            f"the store at {_store_name(store)} is incomplete: {missing} of {spec.n_tiles} "
            "tiles are not written yet. Resume the job that writes it (--resume), or pass "
            "allow_incomplete=True to read it anyway (missing tiles read as 0)."
        )


def to_dask(
    path: Any,
    allow_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> da.Array:
    """The store's ``data`` array as a dask array with the store's chunks.

    Gram: shape ``(c, n, c, n)``, chunks ``(c, B, c, B)``; Jacobian: ``(c, n, d)``, chunks
    ``(c, B, D0)``.

    Raises:
        IncompleteStoreError: tiles missing and ``allow_incomplete`` is False.
    """
    group = open_store(path, "r", storage_options)
    read_spec(group)  # raises NotAStoreError for foreign groups
    if not allow_incomplete:
        check_complete(group)
    arr = group[DATA]
    return da.from_zarr(arr, chunks=arr.chunks)


def to_xarray(
    path: Any,
    allow_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
):
    """The store's ``data`` as a lazy (dask-backed) ``xarray.DataArray`` with named dims.

    Dims: the ``dimension_names`` the ``data`` array records (Gram ``('output_a',
    'example_i', 'output_b', 'example_j')``; Jacobian ``('output', 'example', 'parameter')``;
    a saved PMatDense ``('parameter_i', 'parameter_j')``), else ``dim_0, dim_1, ...``. Integer
    coordinates index each dim; ``attrs`` carry kind, fingerprint, meta and completion state.

    Raises:
        IncompleteStoreError: tiles missing and ``allow_incomplete`` is False.
    """
    import xarray as xr

    group = open_store(path, "r", storage_options)
    spec: StoreSpec = read_spec(group)
    arr = to_dask(group, allow_incomplete=allow_incomplete)
    dims = _dim_names(group, spec)
    coords = {name: np.arange(size) for name, size in zip(dims, spec.shape)}
    attrs = {
        "kind": spec.kind,
        "fingerprint": dict(spec.fingerprint),
        "meta": dict(spec.meta),
        "complete": bool(group.attrs.get("complete", False)),
        "store": _store_name(path),
    }
    return xr.DataArray(arr, dims=dims, coords=coords, attrs=attrs, name=spec.kind)


def _dim_names(group, spec: StoreSpec) -> tuple[str, ...]:
    """The ``data`` array's own zarr ``dimension_names`` when it records them all (so the
    view agrees with ``xarray.open_zarr``), else the kind's names from the spec."""
    names = getattr(group[DATA].metadata, "dimension_names", None)
    if names and len(names) == len(spec.shape) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return spec.dim_names
