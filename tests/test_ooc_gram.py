"""Out-of-core Gram stores (issue 5): GramMatrix(..., store=path, tile=B) equals the
in-memory GramMatrix in float64 for 1, 2 and 3 ranks; resume, refusal, integrity, disk full,
output selection, and the store-backed FMat operations."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
import zarr

import ooc_helpers as H
from checks import rel_max as rel
from nngeo_dist import GramMatrix
from nngeo_dist.object import FMatDense, FVector
from nngeo_dist.object.stored import FMatStored, open_stored
from nngeo_dist.store import StoreDiskFullError, StoreMismatchError, gram_tiles, to_dask
from nngeo_dist.store.job import HookedWriter, parse_outputs, read_tile_log

try:
    from dist_harness import RankError, run_ranks
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import RankError, run_ranks

TOL = 1e-10


def build(path, tile=5, model=None, n=H.N, **kw) -> FMatStored:
    kw.setdefault("progress", False)
    return GramMatrix(model or H.make_model(), H.make_loader(n), representation=FMatStored,
                      store=str(path), tile=tile, **kw)


@pytest.fixture(scope="module")
def dense() -> torch.Tensor:
    return H.dense_gram()


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> FMatStored:
    return build(tmp_path_factory.mktemp("gram") / "g.zarr")  # n = 23, B = 5: last tile of 3


def test_store_equals_in_memory_one_process(stored, dense):
    assert stored.spec.shape == (3, 23, 3, 23) and stored.spec.chunks == (3, 5, 3, 5)
    assert rel(stored.to_torch(), dense) < TOL
    rep = stored.report
    assert rep.tiles_total == len(gram_tiles(23, 5)) == 15 and rep.tiles_computed == 15
    assert sorted(rep.computed) == gram_tiles(23, 5)
    assert zarr.open_group(stored.path, mode="r").attrs["complete"] is True
    assert stored.verify().ok


def test_operations_equal_dense(stored, dense):
    D = FMatDense(dense)
    v = FVector(torch.randn(3, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    assert rel(stored.mv(v).to_torch(), D.mv(v).to_torch()) < TOL
    assert rel(stored.vTMv(v), D.vTMv(v)) < TOL
    assert rel(stored.trace(), D.trace()) < TOL
    assert rel(stored.frobenius_norm(), D.frobenius_norm()) < TOL
    assert rel(stored.get_diag(), D.get_diag()) < TOL
    M = dense.reshape(69, 69)
    exact = torch.linalg.eigvalsh(M).flip(0)
    w, U = stored.top_eigenpairs(k=5, n_power_iter=6)
    assert rel(w, exact[:5]) < 1e-8
    assert rel(M @ U, U * w) < 1e-6  # eigenvectors
    evals, evecs = stored.compute_eigendecomposition(k=4)
    assert rel(evals, exact[:4].flip(0)) < 1e-8  # ascending like FMatDense
    d = M.diagonal().sqrt()
    assert rel(stored.normalised().compute().reshape(69, 69), M / d[:, None] / d[None, :]) < TOL
    proj = stored.kernel_pca(k=2, n_power_iter=6)
    ew, eU = torch.linalg.eigh(M)
    ref = eU[:, -2:].flip(1) * ew[-2:].flip(0).sqrt()
    assert rel(proj.abs(), ref.abs()) < 1e-4  # up to the sign of each component (randomised)
    assert to_dask(stored.path).chunks[1] == (5, 5, 5, 5, 3)
    xr = stored.to_xarray()
    assert xr.dims == ("output_a", "example_i", "output_b", "example_j")
    reopened = open_stored(stored.path)
    assert isinstance(reopened, FMatStored) and rel(reopened.trace(), D.trace()) < TOL
    import nngeo_dist

    assert isinstance(nngeo_dist.load(stored.path), FMatStored)


def test_rerun_complete_store_computes_nothing(stored, dense):
    again = build(stored.path)
    assert again.report.tiles_computed == 0 and again.report.tiles_done_before == 15
    assert rel(again.to_torch(), dense) < TOL


@pytest.mark.parametrize("world", [2, 3])
def test_store_equals_in_memory_ranks(tmp_path, dense, world):
    path, log = str(tmp_path / "g.zarr"), str(tmp_path / "tiles.log")
    res = run_ranks(H.rank_gram, world, path, 5, log, timeout=120)
    assert rel(H.read_store(path), dense) < TOL
    # every tile I <= J computed exactly once, by one rank: no two writers on one chunk
    entries = read_tile_log(log)
    tiles = [t for _, t in entries]
    assert sorted(tiles) == gram_tiles(23, 5)
    by_rank = [set(r["computed"]) for r in res]
    assert all(not (a & b) for i, a in enumerate(by_rank) for b in by_rank[i + 1:])
    assert {r for r, _ in entries} == set(range(world))  # the work is shared
    assert all(r["all"] == 15 and r["total"] == 15 for r in res)
    assert len({r["trace"] for r in res}) == 1


def test_sharded_loader_and_refusal_on_ranks(tmp_path, dense):
    path = str(tmp_path / "g.zarr")
    counts = run_ranks(H.rank_gram_sharded_loader, 2, path, 6, timeout=120)
    assert sum(counts) == len(gram_tiles(23, 6))
    assert rel(H.read_store(path), dense) < TOL
    msgs = run_ranks(H.rank_refused, 2, path, 6, timeout=120)
    assert all("StoreMismatchError" in m or "RankFailed" in m or "rank 0" in m for m in msgs), msgs
    assert "fingerprint['model']" in msgs[0]


@pytest.mark.parametrize("outputs", [[2, 0], ("diff", 0, 2), "1"])
def test_output_selection(tmp_path, outputs):
    K = build(tmp_path / "g.zarr", tile=7, outputs=outputs)
    ref = H.dense_gram(outputs)
    assert K.to_torch().shape == ref.shape
    assert rel(K.to_torch(), ref) < TOL
    assert K.spec.fingerprint["outputs"] != "all"


def test_selection_in_the_function_is_fingerprinted(tmp_path):
    """GramMatrix(..., function=select_outputs(f, sel)) records sel like outputs=sel does."""
    from nngeo_dist.store.job import select_outputs

    model = H.make_model()
    fn = select_outputs(lambda x, y: model(x), ("diff", 0, 2))
    K = GramMatrix(model, H.make_loader(), function=fn, representation=FMatStored,
                   store=str(tmp_path / "g.zarr"), tile=7, progress=False, function_id="f")
    assert K.spec.fingerprint["outputs"] == "diff:2-0" and K.spec.fingerprint["function"] == "f"
    again = build(K.path, tile=7, outputs=("diff", 0, 2), function_id="f")
    assert again.report.tiles_computed == 0
    with pytest.raises(StoreMismatchError, match="outputs"):
        build(K.path, tile=7, outputs=[0], function_id="f")


def test_parse_outputs():
    assert parse_outputs("all") is None and parse_outputs(None) is None
    assert parse_outputs("0,3,5") == (0, 3, 5)
    assert parse_outputs("8-3") == ("diff", 3, 8)
    assert parse_outputs(("diff", 1, 2)) == ("diff", 1, 2)
    for bad in ("a,b", "1-2-3", [1, 1], [], ("diff", 2, 2)):
        with pytest.raises((ValueError, TypeError)):
            parse_outputs(bad)
    with pytest.raises(Exception, match="names output"):
        build("/tmp/never-created-nngeo.zarr", outputs=[5])


def test_mismatched_fingerprint_refused(stored):
    with pytest.raises(StoreMismatchError, match=r"fingerprint\['model'\]"):
        build(stored.path, model=H.make_model(seed=5))
    with pytest.raises(StoreMismatchError, match="chunks"):
        build(stored.path, tile=4)
    with pytest.raises(StoreMismatchError, match=r"fingerprint\['data'\]|shape"):
        build(stored.path, n=22)
    with pytest.raises(StoreMismatchError, match=r"fingerprint\['dtype'\]|dtype"):
        build(stored.path, dtype="float32")
    with pytest.raises(FileExistsError, match="already exists"):
        build(stored.path, resume=False)


def test_another_function_of_the_same_name_refused(tmp_path):
    """Two closures of one factory share a qualified name, and so can two architectures
    with the same parameters: the store compares the function's outputs on the sampled
    examples, so neither resumes the other's store; the same function does."""
    model = H.make_model()

    def scaled(s, m=model):
        return lambda x, y: s * m(x)

    path = str(tmp_path / "g.zarr")

    def run(function, m=model):
        return GramMatrix(m, H.make_loader(), function=function, representation=FMatStored,
                          store=path, tile=7, progress=False)

    first = run(scaled(1.0))
    assert run(scaled(1.0)).report.tiles_computed == 0
    with pytest.raises(StoreMismatchError, match="another function"):
        run(scaled(1.5))
    relu = H.make_model()
    relu[1], relu[3] = torch.nn.ReLU(), torch.nn.ReLU()  # same parameters, same fingerprint
    with pytest.raises(StoreMismatchError, match="another function"):
        run(scaled(1.0, relu), relu)
    assert first.report.tiles_computed == len(gram_tiles(H.N, 7))
    dropout = torch.nn.Sequential(H.make_model(), torch.nn.Dropout(0.5)).eval()
    path = str(tmp_path / "dropout.zarr")
    run(None, dropout)
    dropout.train()  # its outputs are random now: no store can be resumed with it
    with pytest.raises(StoreMismatchError, match=r"model\.eval\(\)"):
        run(None, dropout)


def test_function_probe_tolerance():
    """Recomputed outputs that differ in their last bits resume; a change beyond
    PROBE_RTOL of the largest output is refused."""
    from nngeo_dist.store.job import PROBE_RTOL, check_probe

    a = [3.0, -1.5, 0.25, float("nan")]
    check_probe(a, [3.0 * (1 + 1e-7), -1.5, 0.25, float("nan")], "here")
    check_probe(None, a, "here")  # a store written before probes: nothing to compare
    with pytest.raises(StoreMismatchError, match="differ by 0.001"):
        check_probe(a, [3.0, -1.5, 0.25 + 3e-3, float("nan")], "here")
    with pytest.raises(StoreMismatchError, match="number 3, the store's 4"):
        check_probe(a, a[:3], "here")
    assert PROBE_RTOL < 1e-3


def test_tile_larger_than_n_and_overwrite(tmp_path, dense):
    K = build(tmp_path / "g.zarr", tile=100)
    assert K.spec.chunks == (3, 23, 3, 23) and K.report.tiles_total == 1
    assert rel(K.to_torch(), dense) < TOL
    K2 = build(tmp_path / "g.zarr", tile=6, overwrite=True)
    assert K2.report.tiles_computed == 10 and rel(K2.to_torch(), dense) < TOL


def test_altered_store_detected_and_repaired(tmp_path, dense):
    K = build(tmp_path / "g.zarr")
    g = zarr.open_group(K.path, mode="r+")
    g["data"][:, 5:10, :, 10:15] = g["data"][:, 5:10, :, 10:15] + 1.0  # tile (1, 2) altered
    rep = K.verify()
    assert not rep.ok and rep.changed == [(1, 2)]
    with pytest.raises(ValueError, match="altered"):
        K.check_integrity()
    again = build(K.path)  # resume: checksums re-checked, the altered tile recomputed
    assert again.report.altered == [(1, 2)] and again.report.computed == [(1, 2)]
    assert rel(again.to_torch(), dense) < TOL and again.verify().ok


def test_half_written_tile_is_recomputed(tmp_path, dense):
    K = build(tmp_path / "g.zarr")
    g = zarr.open_group(K.path, mode="r+")
    g["tiles_done"][2, 3] = 0  # as if killed between the data chunk and its marker
    g["data"][:, 10:15, :, 15:20] = 0.0
    again = build(K.path, verify_on_resume=False)
    assert again.report.computed == [(2, 3)]
    assert rel(again.to_torch(), dense) < TOL


def test_disk_full_keeps_finished_tiles(tmp_path, dense, monkeypatch):
    path = tmp_path / "g.zarr"
    calls = {"n": 0}
    orig = HookedWriter._write_data

    def failing(self, region, block):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, region, block)

    monkeypatch.setattr(HookedWriter, "_write_data", failing)
    with pytest.raises(StoreDiskFullError, match="disk full.*--resume"):
        build(path)
    monkeypatch.setattr(HookedWriter, "_write_data", orig)
    done = np.asarray(zarr.open_group(str(path), mode="r")["tiles_done"][...]).astype(bool)
    assert 0 < done.sum() < 25
    again = build(path)
    assert 0 < again.report.tiles_computed < 15
    assert rel(again.to_torch(), dense) < TOL


def test_incomplete_store_refused_by_reader(tmp_path):
    with pytest.raises(FileNotFoundError):
        FMatStored(str(tmp_path / "none.zarr"))


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(H.make_data())


@pytest.mark.parametrize("loader, names", [
    (torch.utils.data.DataLoader(_Stream(), batch_size=4), "not a _Stream"),
    (torch.utils.data.DataLoader(H.make_data(), batch_size=None), "batch_size=None"),
])
def test_loaders_not_read_by_index_refused(tmp_path, loader, names):
    """A store reads each tile's examples by index: a loader whose dataset cannot be
    indexed by example is refused by name, before anything is written."""
    with pytest.raises(TypeError, match=names):
        GramMatrix(H.make_model(), loader, store=str(tmp_path / "g.zarr"), tile=5, progress=False)
    assert not (tmp_path / "g.zarr").exists()


def test_collate_dropping_examples_refused_and_resumable(tmp_path, dense):
    """A collate_fn that drops an example gives a tile fewer rows than its examples: a
    clear error before that tile is written (before the store is created when the
    example is one the fingerprint samples); the tiles written before it are kept, and a
    rerun with a fixed loader resumes."""
    path = str(tmp_path / "g.zarr")
    with pytest.raises(ValueError, match=r"gave 15 rows for the 16 examples \[0, 1, 3.*collate_fn"):
        GramMatrix(H.make_model(), H.loader_dropping(21), representation=FMatStored, store=path,
                   tile=5, progress=False)  # 21 is among the examples the fingerprint samples
    assert not (tmp_path / "g.zarr").exists()
    bad = H.loader_dropping(20)  # in the last tile (examples 20-22), not sampled
    with pytest.raises(ValueError, match=r"gave 2 rows for the 3 examples \[20, 23\).*collate_fn"):
        GramMatrix(H.make_model(), bad, representation=FMatStored, store=path, tile=5,
                   progress=False, background_writes=False)
    again = build(path)
    assert again.report.tiles_done_before == 4  # (0, 0) to (0, 3), written before (0, 4)
    assert rel(torch.from_numpy(H.read_store(path)), dense) < TOL


def _batch_list():
    x, y = H.make_data().tensors
    return [(x[:4], y[:4]), (x[4:4], y[4:4]), (x[4:13], y[4:13]), (x[13:], y[13:])]


def test_list_of_batches_read_as_without_a_store(tmp_path, dense):
    """A list of batches (uneven, one empty) is read as the in-memory helpers read it: the
    dataset of its examples in order; bare tensors as one-tensor batches."""
    model = H.make_model()
    batches = _batch_list()
    got = GramMatrix(model, batches, store=str(tmp_path / "g.zarr"), tile=5, progress=False)
    assert rel(got.to_torch(), dense) < TOL
    bare = GramMatrix(model, [b[0] for b in batches], store=str(tmp_path / "b.zarr"), tile=5,
                      progress=False)
    assert rel(bare.to_torch(), dense) < TOL
    again = GramMatrix(model, batches, store=str(tmp_path / "g.zarr"), tile=5, progress=False)
    assert again.report.tiles_computed == 0  # the same data: resumed, nothing recomputed


@pytest.mark.parametrize("batches, names", [
    ([(torch.zeros(3, 6), ["a", "b", "c"])], "batch 0 .*not a tensor or a tuple of tensors"),
    ([(torch.zeros(3, 6), torch.zeros(2))], "batch 0 .*one leading example dimension"),
    ([torch.zeros(3, 6), (torch.zeros(3, 6), torch.zeros(3))], "batch 1 of the list has 2 tensors"),
    ([torch.zeros(3, 6), torch.zeros(3)], r"tensor 0 of batch 1 .* shape \(\), batch 0's \(6,\)"),
    ([], "no example was seen"),
    ([(torch.zeros(0, 6), torch.zeros(0))], "empty"),
])
def test_list_of_bad_batches_refused(tmp_path, batches, names):
    with pytest.raises((TypeError, ValueError), match=names):
        GramMatrix(H.make_model(), batches, store=str(tmp_path / "g.zarr"), tile=5, progress=False)
    assert not (tmp_path / "g.zarr").exists()


def test_a_tuple_of_tensors_is_one_batch_for_a_data_source():
    """DataSource reads (x, y) as the helpers do (nngeometry's examples): one batch."""
    from nngeo_dist.store.job import DataSource

    x, y = H.make_data().tensors
    source = DataSource((x, y))
    assert source.n == H.N and source.batch_size == H.N
    got = source.examples([0, 5])
    assert torch.equal(got[0], x[[0, 5]]) and torch.equal(got[1], y[[0, 5]])
