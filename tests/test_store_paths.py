"""Store paths and store metadata: a path that is not a zarr store is never deleted nor
recursed on; saved objects (no tile markers) through the tile-store helpers; store dtypes;
dimension names that xarray needs. Fast: tiny arrays, one small model."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeo_dist import FIM, GramMatrix, Jacobian
from nngeo_dist.object import FMatDense, PMatDense, PMatLowRank
from nngeo_dist.store import (
    IncompleteStoreError,
    NotAStoreError,
    StoreSpec,
    TileWriter,
    check_complete,
    create_or_validate,
    is_complete,
    missing_tiles,
    read_spec,
    to_dask,
    to_xarray,
    verify,
    write_gram_tile,
)
from nngeo_dist.store.layout import TILES_CHECKSUM, TILES_DONE, normalise_dtype

NOT_A_STORE = "exists and is not a zarr store"


def user_dir(path) -> str:
    """A user's non-empty directory that is not a zarr store."""
    os.makedirs(path)
    with open(os.path.join(path, "thesis.tex"), "w") as f:
        f.write("precious")
    return str(path)


def tiny_model_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, DataLoader(TensorDataset(torch.randn(5, 3, dtype=torch.float64)), batch_size=2)


def random_gram(c: int, n: int, seed: int = 0) -> np.ndarray:
    """K[a, i, b, j] = J_a(x_i) . J_b(x_j) of a random Jacobian (c, n, 5)."""
    J = np.random.default_rng(seed).standard_normal((c, n, 5))
    return np.einsum("aip,bjp->aibj", J, J)


def write_whole_gram(path, K: np.ndarray, B: int) -> StoreSpec:
    c, n = K.shape[:2]
    spec = StoreSpec.gram(c, n, B)
    w = TileWriter(create_or_validate(path, spec))
    for I, J in w.all_tiles():
        write_gram_tile(w, I, J, K[:, I * B:(I + 1) * B, :, J * B:(J + 1) * B])
    w.mark_complete()
    return spec


# ------------------------------------------------------------------ paths that are no store
@pytest.mark.parametrize("overwrite", [False, True])
def test_create_refuses_a_user_directory_and_keeps_it(tmp_path, overwrite):
    p = user_dir(tmp_path / "results")
    # without overwrite this recursed until RecursionError; with it, the directory was deleted
    with pytest.raises(FileExistsError, match=NOT_A_STORE):
        create_or_validate(p, StoreSpec.gram(1, 4, 2), overwrite=overwrite)
    assert os.listdir(p) == ["thesis.tex"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_create_refuses_a_regular_file_and_keeps_it(tmp_path, overwrite):
    p = tmp_path / "notes.txt"
    p.write_text("precious")
    with pytest.raises(FileExistsError, match=NOT_A_STORE):
        create_or_validate(f"file://{p}", StoreSpec.gram(1, 4, 2), overwrite=overwrite)
    assert p.read_text() == "precious"


@pytest.mark.parametrize("build", ["gram", "jacobian", "lowrank"])
def test_overwrite_on_a_user_directory_computes_nothing_and_deletes_nothing(tmp_path, build):
    model, loader = tiny_model_loader()
    p = user_dir(tmp_path / "results")
    run = {
        "gram": lambda: GramMatrix(model, loader, store=p, overwrite=True, progress=False),
        "jacobian": lambda: Jacobian(model, loader, store=p, overwrite=True, progress=False),
        "lowrank": lambda: FIM(model, loader, PMatLowRank, store=p, overwrite=True, progress=False),
    }[build]
    with pytest.raises(FileExistsError, match=NOT_A_STORE):
        run()
    assert os.listdir(p) == ["thesis.tex"]


def test_ntk_cli_overwrite_keeps_a_user_directory(tmp_path):
    from nngeo_dist import ntk

    p = user_dir(tmp_path / "results")
    with pytest.raises(FileExistsError, match=NOT_A_STORE):
        ntk.main(["--n-examples", "4", "--tile", "2", "--dtype", "float64", "--no-progress",
                  "--model-kwargs", '{"train_steps": 0}', "--out", p, "--overwrite"])
    assert os.listdir(p) == ["thesis.tex"]


def test_overwrite_still_replaces_a_store_and_an_empty_directory_is_a_new_store(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    create_or_validate(empty, StoreSpec.gram(1, 4, 2))
    create_or_validate(empty, StoreSpec.gram(1, 6, 2), overwrite=True)
    assert read_spec(empty).shape == (1, 6, 1, 6)


def test_a_store_being_created_by_another_process_is_waited_for(tmp_path):
    # zarr writes zarr.json through a "*.partial" temporary file: a directory holding only
    # that is a store a concurrent creator is writing, not a user's directory
    p = tmp_path / "s.zarr"
    p.mkdir()
    partial = p / "zarr.0123abcd.partial"
    partial.write_text("{")
    spec = StoreSpec.gram(1, 4, 2)

    def other_creator():
        time.sleep(0.2)
        partial.unlink()
        create_or_validate(p, spec)

    t = threading.Thread(target=other_creator)
    t.start()
    try:
        group = create_or_validate(p, spec)
    finally:
        t.join()
    assert read_spec(group).shape == (1, 4, 1, 4)


# ------------------------------------------------------- saved objects: no tile markers
@pytest.fixture
def saved_fmat(tmp_path):
    """An FMatDense (c=2, n=5) saved whole with .save: StoreSpec attributes, no markers."""
    K = torch.from_numpy(random_gram(2, 5))
    p = str(tmp_path / "fmat.zarr")
    FMatDense(K).save(p)
    return p, K


def test_saved_object_complete_has_no_missing_tiles_and_nothing_to_verify(saved_fmat):
    p, K = saved_fmat
    assert missing_tiles(p) == 0 and is_complete(p)
    np.testing.assert_array_equal(to_dask(p).compute(), K.numpy())
    with pytest.raises(NotAStoreError, match="saved whole by save.*no per-tile checksums"):
        verify(p)


def test_saved_object_incomplete_is_reported_not_keyerror(saved_fmat):
    p, _ = saved_fmat
    zarr.open_group(p, mode="r+").attrs["complete"] = False  # the save died before the end
    assert missing_tiles(p) == read_spec(p).n_tiles  # no marker says any chunk was written
    assert not is_complete(p)
    for view in (check_complete, to_dask):
        with pytest.raises(IncompleteStoreError, match="did not finish.*Save it again"):
            view(p)
    assert to_dask(p, allow_incomplete=True).shape == (2, 5, 2, 5)


# --------------------------------------------------------------------------- store dtypes
@pytest.mark.parametrize("dtype,name", [
    ("float32", "float32"), (torch.float16, "float16"), (np.float64, "float64"),
    ("double", "float64"), (torch.float32, "float32"),
])
def test_float_dtypes_are_normalised(dtype, name):
    assert normalise_dtype(dtype) == name


@pytest.mark.parametrize("dtype", ["int8", np.int64, torch.bfloat16, "bfloat16", "complex64", "bool", None])
def test_non_float_store_dtypes_are_refused(tmp_path, dtype):
    with pytest.raises(ValueError, match="not supported: a store holds float16, float32 or float64"):
        StoreSpec.gram(1, 4, 2, dtype=dtype)


def test_gram_with_int8_store_is_refused_before_computing(tmp_path):
    model, loader = tiny_model_loader()
    p = tmp_path / "g.zarr"
    with pytest.raises(ValueError, match="'int8' is not supported"):
        GramMatrix(model, loader, store=str(p), dtype="int8", progress=False)
    assert not p.exists()


# ---------------------------------------------------------------- dimension names / xarray
def test_xarray_opens_a_gram_tile_store(tmp_path):
    xr = pytest.importorskip("xarray")
    p = tmp_path / "g.zarr"
    K = random_gram(2, 7)
    write_whole_gram(p, K, B=3)
    ds = xr.open_zarr(p, consolidated=False)
    assert ds["data"].dims == ("output_a", "example_i", "output_b", "example_j")
    np.testing.assert_array_equal(ds["data"].values, K)
    assert ds[TILES_DONE].dims == ("example_i_tile", "example_j_tile")
    assert ds[TILES_CHECKSUM].dims == ("example_i_tile", "example_j_tile")
    assert ds[TILES_DONE].shape == (3, 3) and int(ds[TILES_DONE].sum()) == 9


def test_xarray_opens_a_jacobian_tile_store_markers_named_by_tile_axes(tmp_path):
    xr = pytest.importorskip("xarray")
    p = tmp_path / "j.zarr"
    create_or_validate(p, StoreSpec.jacobian(2, 5, 7, B=2, D0=3))
    ds = xr.open_zarr(p, consolidated=False)
    assert ds["data"].dims == ("output", "example", "parameter")
    assert ds[TILES_DONE].dims == ("example_tile", "parameter_tile")
    assert ds[TILES_DONE].shape == (3, 3)


def test_store_written_without_marker_dimension_names_still_resumes(tmp_path):
    # stores written before the marker arrays had dimension names
    p = tmp_path / "old.zarr"
    spec = StoreSpec.gram(2, 7, 3)
    group = create_or_validate(p, spec)
    for name, dtype, fill in ((TILES_CHECKSUM, "int64", -1), (TILES_DONE, "uint8", 0)):
        del group[name]
        group.create_array(name, shape=spec.tile_grid, chunks=(1, 1), dtype=dtype, fill_value=fill)
    assert zarr.open_group(p, mode="r")[TILES_DONE].metadata.dimension_names is None
    K = random_gram(2, 7)
    w = TileWriter(create_or_validate(p, spec))  # resume
    write_gram_tile(w, 0, 1, K[:, 0:3, :, 3:6])
    assert w.done_tiles() == {(0, 1), (1, 0)}
    assert verify(p).ok and verify(p).n_checked == 2


def test_to_xarray_of_a_saved_pmat_dense_uses_the_arrays_dimension_names(tmp_path):
    pytest.importorskip("xarray")
    model, _ = tiny_model_loader()
    from nngeo_dist import LayerCollection

    lc = LayerCollection.from_model(model)
    d = lc.numel()
    M = torch.from_numpy(np.random.default_rng(0).standard_normal((d, d)))
    p = str(tmp_path / "pmat.zarr")
    PMatDense(lc, M).save(p)
    x = to_xarray(p)
    assert x.dims == ("parameter_i", "parameter_j")
    assert x.dims == tuple(zarr.open_group(p, mode="r")["data"].metadata.dimension_names)
    np.testing.assert_array_equal(x.values, M.numpy())
