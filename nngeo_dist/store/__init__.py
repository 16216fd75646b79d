"""Storage of large results: zarr v3 layouts, resumable tile writers, dask/xarray views,
out-of-core linear algebra. See DESIGN.md section 4. Torch is not imported here."""

from .layout import (
    DATA,
    TILES_CHECKSUM,
    TILES_DONE,
    NotAStoreError,
    StoreMismatchError,
    StoreSpec,
    create_or_validate,
    library_version,
    open_store,
    read_spec,
    store_exists,
)
from .tiles import (
    IncompleteStoreError,
    StoreDiskFullError,
    TileWriter,
    VerifyReport,
    gram_tiles,
    grid_tiles,
    missing_tiles,
    tile_checksum,
    verify,
    write_gram_tile,
)
from .views import check_complete, is_complete, to_dask, to_xarray
from .streaming import (
    frobenius,
    gram_diag,
    gram_matmat,
    gram_mv,
    gram_trace,
    jac_mv,
    jac_rmv,
    kernel_pca,
    normalised_gram,
    top_eigenpairs,
)

__all__ = [
    "DATA", "TILES_CHECKSUM", "TILES_DONE",
    "NotAStoreError", "StoreMismatchError", "StoreSpec", "create_or_validate",
    "library_version", "open_store", "read_spec", "store_exists",
    "IncompleteStoreError", "StoreDiskFullError", "TileWriter", "VerifyReport",
    "gram_tiles", "grid_tiles", "missing_tiles", "tile_checksum", "verify", "write_gram_tile",
    "check_complete", "is_complete", "to_dask", "to_xarray",
    "frobenius", "gram_diag", "gram_matmat", "gram_mv", "gram_trace", "jac_mv", "jac_rmv",
    "kernel_pca", "normalised_gram", "top_eigenpairs",
]
