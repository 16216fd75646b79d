"""save / load of every stored representation: round trips (float64, exact), the zarr layout
as xarray and plain zarr see it, refusals, and row-sharded saves from 2 ranks loaded on 1
and on 3 ranks (a rank with no rows included)."""
from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader

import models
from dist_harness import run_ranks
from nngeo_dist import FIM, GramMatrix, Jacobian, LayerCollection, load as top_level_load
from nngeo_dist.dist.sharding import shard_range
from nngeo_dist.object import (
    FMatDense, FVector, PMatAbstract, PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit,
    PMatLowRank, PushForwardDense, PushForwardImplicit, PVector,
)
from nngeo_dist.object import pspace
from nngeo_dist.store import StoreMismatchError, to_dask, to_xarray
from nngeo_dist.store.layout import NotAStoreError
from nngeo_dist.store.objects import (
    NotSaveableError, check_output_path, load, read_attrs, save,
)
from nngeo_dist.store.tiles import IncompleteStoreError

PMatKFAC = getattr(pspace, "PMatKFAC", None)
PMatEKFAC = getattr(pspace, "PMatEKFAC", None)
PMatQuasiDiag = getattr(pspace, "PMatQuasiDiag", None)
PMatMixed = getattr(pspace, "PMatMixed", None)

RTOL = 1e-10


# ----------------------------------------------------------------------------- objects


def _objects() -> dict:
    """name -> (object, model): every saveable representation of this installation."""
    out = {}
    cnn, b, _ = models.make("mixed_cnn", n=9, batch_size=4)
    L = models.loader_of(b)
    for R in (PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatQuasiDiag):
        if R is not None:
            out[R.__name__] = (FIM(cnn, L, R, progress=False), cnn)
    emb, eb, _ = models.make("embedding", n=9, batch_size=4)
    EL = models.loader_of(eb)
    if PMatKFAC is not None:
        out["PMatKFAC"] = (FIM(emb, EL, PMatKFAC, progress=False), emb)
        out["PMatMixed_conv"] = (FIM(cnn, L, {"Conv2d": PMatKFAC, "Linear": PMatKFAC, "default": PMatDiag},
                                    progress=False), cnn) if PMatMixed is not None else None
    if PMatEKFAC is not None:  # an Embedding: U_A is None (A is diagonal)
        out["PMatEKFAC"] = (FIM(emb, EL, PMatEKFAC, progress=False, update_diag=True), emb)
    if PMatMixed is not None and PMatKFAC is not None and PMatEKFAC is not None:
        mapping = {"Conv2d": PMatKFAC, "Linear": PMatEKFAC, "7": PMatLowRank, "default": PMatBlockDiag}
        out["PMatMixed"] = (FIM(cnn, L, mapping, progress=False), cnn)
    bare = nn.Linear(3, 2).double()  # its only layer is named "" (not a zarr node name)
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    BL = DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(7, dtype=torch.long)), batch_size=3)
    out["PMatBlockDiag_bare"] = (FIM(bare, BL, PMatBlockDiag if PMatKFAC is None else PMatKFAC, progress=False), bare)
    out["FMatDense"] = (GramMatrix(cnn, L, progress=False), cnn)
    J = Jacobian(cnn, L, progress=False)
    out["PushForwardDense"] = (J, cnn)
    out["PullBackDense"] = (J.transpose(), cnn)
    return {k: v for k, v in out.items() if v is not None}


@pytest.fixture(scope="module")
def objects():
    return _objects()


def _pvec(lc, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=torch.float64, generator=g))


def _ops(F, like=None) -> dict:
    """Every operation of F on fixed vectors (NotImplementedError recorded as such)."""
    out = {"to_torch": F.to_torch()}
    if isinstance(F, PMatAbstract):
        v = _pvec(F.layer_collection)
        calls = {
            "mv": lambda: F.mv(v).to_torch(), "vTMv": lambda: F.vTMv(v), "trace": F.trace,
            "frobenius_norm": F.frobenius_norm, "get_diag": F.get_diag,
            "solve": lambda: F.solve(v, regul=1e-3).to_torch(),
            "inverse": lambda: F.inverse(regul=1e-3).to_torch(),
        }
    elif isinstance(F, FMatDense):
        c, n = F.data.shape[:2]
        u = FVector(torch.randn(c, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        calls = {"mv": lambda: F.mv(u).to_torch(), "vTMv": lambda: F.vTMv(u), "trace": F.trace,
                 "frobenius_norm": F.frobenius_norm}
    elif isinstance(F, PushForwardDense):
        calls = {"mv": lambda: F.mv(_pvec(F.layer_collection)).to_torch()}
    else:  # PullBackDense
        c, n = F.data.shape[:2]
        u = FVector(torch.randn(c, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        calls = {"mv": lambda: F.mv(u).to_torch()}
    for name, call in calls.items():
        try:
            out[name] = call()
        except NotImplementedError:
            out[name] = "NotImplementedError"
    return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", [
    "PMatDense", "PMatDiag", "PMatBlockDiag", "PMatLowRank", "PMatQuasiDiag", "PMatKFAC",
    "PMatMixed_conv", "PMatEKFAC", "PMatMixed", "PMatBlockDiag_bare", "FMatDense",
    "PushForwardDense", "PullBackDense",
])
def test_round_trip_is_exact(objects, name, tmp_path):
    if name not in objects:
        pytest.skip(f"{name} is not available in this installation")
    F, model = objects[name]
    path = tmp_path / f"{name}.zarr"
    assert save(F, path) == str(path)
    G = top_level_load(str(path))
    assert type(G) is type(F)
    if hasattr(F, "layer_collection"):
        assert G.layer_collection == F.layer_collection
        assert G.layer_collection == LayerCollection.from_model(model)
    before, after = _ops(F), _ops(G)
    assert before.keys() == after.keys()
    for op in before:
        assert _same(before[op], after[op]), f"{name}.{op} differs after load"
    attrs = read_attrs(path)
    assert attrs["complete"] is True
    assert attrs["representation"] == type(F).__name__
    assert attrs["library_version"]


def test_lowrank_n_and_mixed_parts_survive(objects, tmp_path):
    F, _ = objects["PMatLowRank"]
    save(F, tmp_path / "lr.zarr")
    assert load(tmp_path / "lr.zarr").n == F.n == 9
    if "PMatMixed" in objects:
        M, _ = objects["PMatMixed"]
        save(M, tmp_path / "mixed.zarr")
        N = load(tmp_path / "mixed.zarr")
        assert [type(p) for p in N.parts] == [type(p) for p in M.parts]
        assert {k: v.__name__ for k, v in N.mapping.items()} == {k: v.__name__ for k, v in M.mapping.items()}
        lr = [p for p in N.parts if isinstance(p, PMatLowRank)][0]
        assert lr.n == 9


def test_bfloat16_round_trip(tmp_path):
    lc = LayerCollection.from_model(nn.Linear(3, 2))
    D = PMatDiag(lc, torch.linspace(0, 1, lc.numel()).to(torch.bfloat16))
    save(D, tmp_path / "bf.zarr")
    E = load(tmp_path / "bf.zarr")
    assert E.data.dtype == torch.bfloat16 and torch.equal(E.data, D.data)


def test_device_argument(objects, tmp_path):
    F, _ = objects["PMatDiag"]
    save(F, tmp_path / "d.zarr")
    assert load(tmp_path / "d.zarr", device="cpu").data.device.type == "cpu"


# ----------------------------------------------------------------------------- open without the library


def test_arrays_open_with_plain_zarr_and_xarray(objects, tmp_path):
    import xarray as xr

    F, _ = objects["PMatDense"]
    save(F, tmp_path / "dense.zarr", meta={"variant": "classif_logits"})
    root = zarr.open_group(str(tmp_path / "dense.zarr"), mode="r")
    assert np.array_equal(root["data"][...], F.data.numpy())
    assert root.attrs["meta"]["variant"] == "classif_logits"
    ds = xr.open_zarr(str(tmp_path / "dense.zarr"), consolidated=False)
    assert ds["data"].dims == ("parameter_i", "parameter_j")
    assert np.array_equal(ds["data"].values, F.data.numpy())
    assert np.array_equal(to_xarray(str(tmp_path / "dense.zarr")).values, F.data.numpy())

    if "PMatKFAC" in objects:  # per-layer families: one xarray Dataset per group
        K, _ = objects["PMatKFAC"]
        save(K, tmp_path / "kfac.zarr")
        A = xr.open_zarr(str(tmp_path / "kfac.zarr"), group="A", consolidated=False)
        for name, (a, g) in K.data.items():
            assert np.array_equal(A[name].values, a.numpy())
        assert np.array_equal(zarr.open_group(str(tmp_path / "kfac.zarr"), mode="r")["G/2"][...],
                              K.data["2"][1].numpy())

    K, _ = objects["FMatDense"]  # the Gram and the Jacobian: the store layouts of DESIGN.md §4
    save(K, tmp_path / "gram.zarr")
    xa = to_xarray(str(tmp_path / "gram.zarr"))
    assert xa.dims == ("output_a", "example_i", "output_b", "example_j")
    assert np.array_equal(xa.values, K.data.numpy())
    J, _ = objects["PushForwardDense"]
    save(J, tmp_path / "jac.zarr")
    assert to_dask(str(tmp_path / "jac.zarr")).chunks[0] == (J.data.shape[0],)
    assert np.array_equal(to_dask(str(tmp_path / "jac.zarr")).compute(), J.data.numpy())


def test_tile_stores_open_out_of_core(objects, tmp_path):
    """A saved FMatDense is a Gram store (DESIGN.md §4): the store-backed FMatStored opens it;
    and load() opens a Gram store written tile by tile as its store-backed object."""
    stored = pytest.importorskip("nngeo_dist.object.stored")
    K, _ = objects["FMatDense"]
    save(K, tmp_path / "gram.zarr")
    S = stored.FMatStored(str(tmp_path / "gram.zarr"))
    assert torch.equal(S.to_torch(), K.data)
    m, b, _ = models.make("linear")
    L = models.loader_of(b)
    GramMatrix(m, L, representation=stored.FMatStored, store=str(tmp_path / "tiles.zarr"), progress=False)
    T = load(tmp_path / "tiles.zarr")
    assert isinstance(T, stored.FMatStored)
    torch.testing.assert_close(T.to_torch(), GramMatrix(m, L, progress=False).data, rtol=RTOL, atol=1e-14)
    with pytest.raises(NotSaveableError, match="already lives in the zarr store"):
        save(T, tmp_path / "again.zarr")


# ----------------------------------------------------------------------------- refusals


def test_existing_store_refused_unless_overwrite(objects, tmp_path):
    F, _ = objects["PMatDiag"]
    B, _ = objects["PMatBlockDiag"]
    path = tmp_path / "F.zarr"
    save(B, path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save(F, path)
    save(F, path, overwrite=True)
    G = load(path)
    assert isinstance(G, PMatDiag) and torch.equal(G.data, F.data)
    assert "block" not in zarr.open_group(str(path), mode="r")  # no stale arrays left behind


def test_non_zarr_path_is_never_deleted(objects, tmp_path):
    F, _ = objects["PMatDiag"]
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        save(F, precious, overwrite=True)
    with pytest.raises(FileExistsError, match="not a zarr store"):
        check_output_path(precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_generator_backed_objects_cannot_be_saved(tmp_path):
    m, b, _ = models.make("linear")
    L = models.loader_of(b)
    for F in (FIM(m, L, PMatImplicit, progress=False), Jacobian(m, L, representation=PushForwardImplicit)):
        with pytest.raises(NotSaveableError, match="cannot be saved"):
            save(F, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_load_refuses_incomplete_and_foreign_stores(objects, tmp_path):
    F, _ = objects["PMatDiag"]
    save(F, tmp_path / "F.zarr")
    zarr.open_group(str(tmp_path / "F.zarr"), mode="r+").attrs.update({"complete": False})
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        load(tmp_path / "F.zarr")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").create_array("x", shape=(2,), dtype="f8")
    with pytest.raises(NotAStoreError, match="no saved nngeo_dist object"):
        load(tmp_path / "foreign.zarr")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.zarr")


def test_check_output_path_outcomes(objects, tmp_path):
    F, _ = objects["PMatDiag"]
    path = tmp_path / "F.zarr"
    fp = {"model": "m", "representation": "diag"}
    assert check_output_path(path) == "new"
    save(F, path, fingerprint=fp)
    with pytest.raises(FileExistsError) as e:
        check_output_path(path)
    assert "--overwrite" in str(e.value) and "--resume" in str(e.value)
    assert check_output_path(path, overwrite=True) == "overwrite"
    assert check_output_path(path, resume=True, fingerprint=fp) == "done"
    with pytest.raises(StoreMismatchError, match="representation"):
        check_output_path(path, resume=True, fingerprint={**fp, "representation": "kfac"})
    zarr.open_group(str(path), mode="r+").attrs.update({"complete": False})
    assert check_output_path(path, resume=True, fingerprint=fp) == "resume"


# ----------------------------------------------------------------------------- several ranks


def _dataset(n):
    m, b, _ = models.make("linear", n=n, batch_size=4)
    return m, models.loader_of(b).dataset


def _takes_group(cls) -> bool:
    return "group" in inspect.signature(cls.__init__).parameters


def _rank_save(rank, world, out):
    """2 ranks: a row-sharded PMatLowRank, a replicated KFAC/BlockDiag, the refusal of an
    existing path (same error on every rank)."""
    from nngeo_dist.dist import shard_loader

    m, ds = _dataset(11)
    L = shard_loader(ds, batch_size=4)
    F = FIM(m, L, PMatLowRank, progress=False)
    save(F, os.path.join(out, "lowrank.zarr"))
    R = FIM(m, L, PMatKFAC or PMatBlockDiag, progress=False)
    save(R, os.path.join(out, "replicated.zarr"), fingerprint={"what": "replicated"})
    J = Jacobian(m, L, progress=False)
    jac_rows = None
    if getattr(J, "group", None) is not None:  # row-sharded push-forwards, where available
        save(J, os.path.join(out, "jacobian.zarr"))
        jac_rows = J.data.shape[1]
    K = GramMatrix(m, L, progress=False)
    gram_rows = None
    if getattr(K, "group", None) is not None:  # row-sharded Gram rows, where available
        save(K, os.path.join(out, "gram.zarr"))
        gram_rows = K.data.shape[1]
    errors = []
    for kw in ({}, {"resume": True, "fingerprint": {"what": "else"}}):
        try:
            check_output_path(os.path.join(out, "replicated.zarr"), **kw)
            errors.append(None)
        except Exception as e:  # noqa: BLE001
            errors.append((type(e).__name__, str(e)))
    return {"rows": F.data.shape[1], "replicated": R.to_torch(), "errors": errors, "jac_rows": jac_rows,
            "gram_rows": gram_rows}


def _small_rows():
    lc = LayerCollection.from_model(nn.Linear(3, 2))
    g = torch.Generator().manual_seed(5)
    return lc, torch.randn(2, 2, lc.numel(), dtype=torch.float64, generator=g)


def _rank_load(rank, world, out):
    """3 ranks: each loads its rows of the 2-rank store; saves 2 examples over 3 ranks."""
    F = load(os.path.join(out, "lowrank.zarr"))
    v = _pvec(F.layer_collection)
    res = {"rows": F.data.shape[1], "mv": F.mv(v).to_torch(), "vTMv": F.vTMv(v), "trace": F.trace(),
           "to_torch": F.to_torch(), "replicated": load(os.path.join(out, "replicated.zarr")).to_torch()}
    lc, rows = _small_rows()
    mine = rows[:, shard_range(2, rank, world).start:shard_range(2, rank, world).stop]
    import torch.distributed as dist

    small = PMatLowRank(lc, mine, 2, group=dist.group.WORLD)  # row-sharded, rank 2 holds no row
    res["small_rows"] = small.data.shape[1]
    save(small, os.path.join(out, "lowrank_small.zarr"))
    if os.path.exists(os.path.join(out, "gram.zarr")):
        K = load(os.path.join(out, "gram.zarr"))
        res["gram_rows"], res["gram_trace"] = K.data.shape[1], K.trace()
    if os.path.exists(os.path.join(out, "jacobian.zarr")):
        res["jac_rows"] = load(os.path.join(out, "jacobian.zarr")).data.shape[1]
    return res


@pytest.mark.dist
def test_sharded_save_on_2_ranks_loads_on_1_and_3(tmp_path):
    out = str(tmp_path)
    saved = run_ranks(_rank_save, 2, out)
    assert [s["rows"] for s in saved] == [6, 5]

    m, ds = _dataset(11)
    ref = FIM(m, DataLoader(ds, batch_size=4), PMatLowRank, progress=False)
    arr = zarr.open_group(os.path.join(out, "lowrank.zarr"), mode="r")["data"]
    assert arr.shape[1] == 11 and arr.chunks[1] <= 5  # a chunk holds rows of at most 2 ranks

    one = load(os.path.join(out, "lowrank.zarr"), group=None)  # one process: every row
    assert one.group is None and one.n == 11
    torch.testing.assert_close(one.data, ref.data, rtol=RTOL, atol=0)
    v = _pvec(ref.layer_collection)
    torch.testing.assert_close(one.mv(v).to_torch(), ref.mv(v).to_torch(), rtol=RTOL, atol=1e-14)

    # the replicated object: rank 0's, exactly; every rank raised the same refusal
    assert torch.equal(load(os.path.join(out, "replicated.zarr")).to_torch(), saved[0]["replicated"])
    for s in saved:
        assert s["errors"] == saved[0]["errors"]
    assert saved[0]["errors"][0][0] == "FileExistsError" and "--overwrite" in saved[0]["errors"][0][1]
    assert saved[0]["errors"][1][0] == "StoreMismatchError"

    loaded = run_ranks(_rank_load, 3, out)
    assert [r["rows"] for r in loaded] == [len(shard_range(11, r, 3)) for r in range(3)]
    for r in loaded:
        torch.testing.assert_close(r["mv"], ref.mv(v).to_torch(), rtol=RTOL, atol=1e-14)
        torch.testing.assert_close(r["vTMv"], ref.vTMv(v), rtol=RTOL, atol=0)
        torch.testing.assert_close(r["trace"], ref.trace(), rtol=RTOL, atol=0)
        torch.testing.assert_close(r["to_torch"], ref.to_torch(), rtol=RTOL, atol=1e-14)
        assert torch.equal(r["replicated"], saved[0]["replicated"])

    # 2 examples over 3 ranks: rank 2 held no rows, the store holds both
    assert [r["small_rows"] for r in loaded] == [1, 1, 0]
    lc, rows = _small_rows()
    small = load(os.path.join(out, "lowrank_small.zarr"))
    assert small.n == 2 and torch.equal(small.data, rows)

    if _takes_group(PushForwardDense):  # row-sharded push-forwards: each rank wrote its rows
        assert saved[0]["jac_rows"] is not None
        assert [s["jac_rows"] for s in saved] == [6, 5]
        assert [r["jac_rows"] for r in loaded] == [4, 4, 3]
        J = Jacobian(m, DataLoader(ds, batch_size=4), progress=False)
        torch.testing.assert_close(load(os.path.join(out, "jacobian.zarr"), group=None).data, J.data,
                                   rtol=RTOL, atol=1e-14)

    if _takes_group(FMatDense):
        assert [s["gram_rows"] for s in saved] == [6, 5]
        assert [r["gram_rows"] for r in loaded] == [4, 4, 3]
        K = GramMatrix(m, DataLoader(ds, batch_size=4), progress=False)
        arr = zarr.open_group(os.path.join(out, "gram.zarr"), mode="r")["data"]
        assert arr.chunks[1] == arr.chunks[3] <= 5  # (c, B, c, B)
        torch.testing.assert_close(load(os.path.join(out, "gram.zarr"), group=None).data, K.data,
                                   rtol=RTOL, atol=1e-14)
        for r in loaded:
            torch.testing.assert_close(r["gram_trace"], K.trace(), rtol=RTOL, atol=0)



def _lc9():
    return LayerCollection.from_model(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))  # d = 9


def _rows14():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 14, _lc9().numel(), dtype=torch.float64, generator=g)


def _rank_save_small_chunks(rank, world, out):
    """3 ranks holding 5, 5, 4 rows; 3 rows per chunk: the rank boundaries 5 and 10 fall
    inside chunks [3, 6) and [9, 12), each written by two ranks in turn."""
    import torch.distributed as dist

    import nngeo_dist.store.objects as objects

    objects.CHUNK_BYTES = 3 * 2 * 9 * 8  # 3 rows of (c=2, d=9) float64
    rows = shard_range(14, rank, world)
    F = PMatLowRank(_lc9(), _rows14()[:, rows.start:rows.stop], 14, group=dist.group.WORLD)
    save(F, os.path.join(out, "chunked.zarr"))
    return zarr.open_group(os.path.join(out, "chunked.zarr"), mode="r")["data"].chunks


@pytest.mark.dist
def test_sharded_rows_inside_shared_chunks(tmp_path):
    chunks = run_ranks(_rank_save_small_chunks, 3, str(tmp_path))
    assert chunks[0] == (2, 3, 9)
    F = load(tmp_path / "chunked.zarr", group=None)
    assert torch.equal(F.data, _rows14()) and F.n == 14
