"""Out-of-core Jacobian and low-rank FIM stores (issue 5): chunks (c, B, D0); operations
(J v, J^T u, mv, vTMv, trace, diag, Frobenius norm, eigenpairs) stream the chunks and equal
the in-memory PushForwardDense / PMatLowRank in float64."""
from __future__ import annotations

import pytest
import torch

import ooc_helpers as H
from checks import rel_max as rel
from nngeo_dist import FIM, Jacobian
from nngeo_dist.object import FVector, PMatLowRank, PVector
from nngeo_dist.object.stored import PMatLowRankStored, PushForwardStored, open_stored
from nngeo_dist.store import StoreMismatchError, grid_tiles
from nngeo_dist.store.job import read_tile_log

try:
    from dist_harness import run_ranks
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import run_ranks

TOL = 1e-10


@pytest.fixture(scope="module")
def jac(tmp_path_factory):
    model = H.make_model()
    ref = Jacobian(model, H.make_loader())
    path = str(tmp_path_factory.mktemp("jac") / "j.zarr")
    # d = 6*8+8 + 8*5+5 + 5*3+3 = 119 parameters: chunks of 50 (last one 19), tiles of 6 (last 5)
    J = Jacobian(model, H.make_loader(), representation=PushForwardStored, store=path, tile=6,
                 d_chunk=50, progress=False)
    return model, ref, J


def test_jacobian_store_equals_in_memory(jac):
    model, ref, J = jac
    assert J.spec.shape == (3, 23, 119) and J.spec.chunks == (3, 6, 50)
    assert J.report.tiles_total == 4 * 3 and J.report.tiles_computed == 12
    assert rel(J.to_torch(), ref.to_torch()) < TOL
    g = torch.Generator().manual_seed(0)
    v = PVector(ref.layer_collection, vector_repr=torch.randn(119, dtype=torch.float64, generator=g))
    u = FVector(torch.randn(3, 23, dtype=torch.float64, generator=g))
    assert rel(J.mv(v).to_torch(), ref.mv(v).to_torch()) < TOL
    assert rel(J.vjp(u).to_torch(), ref.vjp(u).to_torch()) < TOL
    assert rel(J.transpose().mv(u).to_torch(), ref.transpose().mv(u).to_torch()) < TOL
    again = Jacobian(model, H.make_loader(), representation=PushForwardStored, store=J.path, tile=6,
                     d_chunk=50, progress=False)
    assert again.report.tiles_computed == 0
    with pytest.raises(StoreMismatchError, match="chunks|tile"):
        Jacobian(model, H.make_loader(), representation=PushForwardStored, store=J.path, tile=6,
                 d_chunk=40, progress=False)
    assert isinstance(open_stored(J.path, ref.layer_collection), PushForwardStored)
    import nngeo_dist

    loaded = nngeo_dist.load(J.path)  # the layer collection is recorded in the store
    assert isinstance(loaded, PushForwardStored) and loaded.layer_collection == ref.layer_collection
    assert rel(loaded.vjp(u).to_torch(), ref.vjp(u).to_torch()) < TOL


def test_jacobian_store_two_ranks(tmp_path, jac):
    _, ref, _ = jac
    path, log = str(tmp_path / "j.zarr"), str(tmp_path / "tiles.log")
    res = run_ranks(H.rank_jacobian, 2, path, 6, 50, log, timeout=120)
    assert rel(H.read_store(path), ref.to_torch()) < TOL
    tiles = [t for _, t in read_tile_log(log)]
    assert sorted(tiles) == grid_tiles((4, 3))  # each chunk written once
    assert not (set(res[0]) & set(res[1])) and res[0] and res[1]


@pytest.mark.parametrize("variant", ["classif_logits", "regression"])
def test_lowrank_store_equals_in_memory(tmp_path, variant):
    model = H.make_model()
    ref = FIM(model, H.make_loader(), PMatLowRank, variant=variant)
    F = FIM(model, H.make_loader(), PMatLowRankStored, variant=variant, store=str(tmp_path / "f.zarr"),
            tile=7, d_chunk=32, progress=False)
    assert F.spec.kind == "lowrank"
    g = torch.Generator().manual_seed(1)
    v = PVector(ref.layer_collection, vector_repr=torch.randn(119, dtype=torch.float64, generator=g))
    assert rel(F.mv(v).to_torch(), ref.mv(v).to_torch()) < TOL
    assert rel(F.vTMv(v), ref.vTMv(v)) < TOL
    assert rel(F.trace(), ref.trace()) < TOL
    assert rel(F.get_diag(), ref.get_diag()) < TOL
    assert rel(F.frobenius_norm(), ref.frobenius_norm()) < TOL
    assert rel(F.to_torch(), ref.to_torch()) < TOL
    exact = torch.linalg.eigvalsh(ref.to_torch()).flip(0)
    evals, evecs = F.compute_eigendecomposition(k=4, n_power_iter=8)
    assert rel(evals.flip(0), exact[:4]) < 1e-8
    M = ref.to_torch()
    assert rel(M @ evecs, evecs * evals) < 1e-5
    assert rel(F.to_memory().to_torch(), M) < TOL
    import nngeo_dist

    loaded = nngeo_dist.load(F.path)
    assert isinstance(loaded, PMatLowRankStored) and rel(loaded.mv(v).to_torch(), ref.mv(v).to_torch()) < TOL
    with pytest.raises(NotImplementedError, match="to_memory"):
        F.solve(v)


def test_lowrank_store_records_variant(tmp_path):
    """What FIM passes when it forwards its variant and the user's function (see metrics)."""
    from nngeo_dist.generator import Generator
    from nngeo_dist.generator.variants import fim_root

    model = H.make_model()
    gen = Generator(model, fim_root(lambda x, y: model(x), "regression"), progress=False)
    F = PMatLowRankStored.build(gen, H.make_loader(), store=str(tmp_path / "f.zarr"), tile=8,
                                variant="regression", user_function=None)
    assert F.spec.meta["variant"] == "regression"
    assert F.spec.fingerprint["function"] == "fim_root[regression](model(batch[0]))"


def test_collate_dropping_examples_refused_and_resumable(tmp_path, jac):
    """A tile of Jacobian rows short of an example is refused before it is written; the
    rows written before it are kept and a rerun with a fixed loader resumes."""
    model, ref, _ = jac
    bad = H.loader_dropping(20)  # in the last tile (examples 18-22), not sampled
    path = str(tmp_path / "j.zarr")
    kw = dict(representation=PushForwardStored, store=path, tile=6, d_chunk=50, progress=False)
    with pytest.raises(ValueError, match=r"gave 4 rows for the 5 examples \[18, 23\).*collate_fn"):
        Jacobian(model, bad, background_writes=False, **kw)
    again = Jacobian(model, H.make_loader(), **kw)
    assert again.report.tiles_done_before == 9  # the first three row tiles, 3 chunks each
    assert rel(again.to_torch(), ref.to_torch()) < TOL


def test_list_of_batches_read_as_without_a_store(tmp_path, jac):
    model, ref, _ = jac
    x, y = H.make_data().tensors
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    J = Jacobian(model, batches, representation=PushForwardStored, store=str(tmp_path / "j.zarr"),
                 tile=6, d_chunk=50, progress=False)
    assert rel(J.to_torch(), ref.to_torch()) < TOL
    F = FIM(model, batches, PMatLowRank, store=str(tmp_path / "f.zarr"), progress=False)
    assert rel(F.to_torch(), FIM(model, batches, PMatLowRank).to_torch()) < TOL


def test_default_chunks_bound_a_tile_in_memory():
    """The default example tile keeps its Jacobian rows (c, B, d) within the budget, down
    to one example for a model too large for more; chunks stay within 16 M entries."""
    from nngeo_dist.store.jacobian import (DEFAULT_CHUNK_ENTRIES, DEFAULT_ROW_TILE_ENTRIES,
                                           default_jacobian_chunks)

    assert default_jacobian_chunks(23, 3, 119) == (23, 119)  # small: one tile, one chunk
    for n, c, d in [(5000, 10, 31_000), (100_000, 10, 25_000_000), (3, 1000, 10**9)]:
        B, D0 = default_jacobian_chunks(n, c, d)
        assert B == max(1, min(n, 1024, DEFAULT_ROW_TILE_ENTRIES // (c * d)))
        assert B == 1 or c * B * d <= DEFAULT_ROW_TILE_ENTRIES
        assert c * B * D0 <= max(DEFAULT_CHUNK_ENTRIES, c * B)
    assert default_jacobian_chunks(5000, 10, 31_000)[0] == 216


@pytest.mark.parametrize("kw, name", [(dict(tile=0), "tile=0"), (dict(tile=2.5), "tile=2.5"),
                                      (dict(tile=-3), "tile=-3"), (dict(d_chunk=0), "d_chunk=0")])
def test_bad_chunk_sizes_refused(tmp_path, kw, name):
    """0 or 2.5 would silently mean the default or 2: refused, nothing written."""
    with pytest.raises(ValueError, match=rf"{name}: a chunk size must be a positive whole number"):
        Jacobian(H.make_model(), H.make_loader(), representation=PushForwardStored,
                 store=str(tmp_path / "j.zarr"), progress=False, **kw)
    assert not (tmp_path / "j.zarr").exists()


def test_store_with_a_representation_held_in_memory_refused(tmp_path):
    from nngeo_dist.object import PMatDiag, PMatKFAC

    for rep in (PMatDiag, PMatKFAC):
        with pytest.raises(TypeError, match=f"only PMatLowRank.*{rep.__name__} is computed in memory"):
            FIM(H.make_model(), H.make_loader(), rep, store=str(tmp_path / "f.zarr"))
    assert not (tmp_path / "f.zarr").exists()


@pytest.mark.parametrize("helper", ["Jacobian", "GramMatrix"])
def test_n_output_checked_with_a_store(tmp_path, helper):
    """n_output is checked as without a store, before the store is created."""
    from nngeo_dist import GramMatrix

    fn = {"Jacobian": Jacobian, "GramMatrix": GramMatrix}[helper]
    with pytest.raises(ValueError, match="n_output=5 but the function returns 3 outputs"):
        fn(H.make_model(), H.make_loader(), n_output=5, store=str(tmp_path / "s.zarr"), progress=False)
    assert not (tmp_path / "s.zarr").exists()
    got = fn(H.make_model(), H.make_loader(), n_output=3, store=str(tmp_path / "s.zarr"), progress=False)
    assert got.to_torch().shape[0] == 3


def test_dask_engine_is_for_gram_stores(tmp_path):
    """engine='dask' computes Gram stores only: a Jacobian or low-rank store refuses it by
    name before anything is written."""
    for make_store in (lambda p: Jacobian(H.make_model(), H.make_loader(), store=p, engine="dask"),
                       lambda p: FIM(H.make_model(), H.make_loader(), PMatLowRank, store=p, engine="dask")):
        path = str(tmp_path / "s.zarr")
        with pytest.raises(ValueError, match=r"engine='dask'.*dask engine computes Gram stores only"):
            make_store(path)
        assert not (tmp_path / "s.zarr").exists()
