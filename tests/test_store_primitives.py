"""Store primitives: layouts, resumable concurrent tile writing, views, streaming linear algebra.

Fast (a few seconds): small arrays, 2-3 spawned writer processes.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from nngeo_dist.store import (
    IncompleteStoreError,
    StoreDiskFullError,
    StoreMismatchError,
    StoreSpec,
    TileWriter,
    create_or_validate,
    frobenius,
    gram_diag,
    gram_mv,
    gram_tiles,
    gram_trace,
    jac_mv,
    jac_rmv,
    kernel_pca,
    normalised_gram,
    read_spec,
    to_dask,
    to_xarray,
    top_eigenpairs,
    verify,
    write_gram_tile,
)

FP = {"model": "m0", "data": "d0", "function": "f0", "tile": "4", "dtype": "float64"}


# ---------------------------------------------------------------------------------------
# helpers (module level: spawned processes import them)
# ---------------------------------------------------------------------------------------
def expected_gram(c: int, n: int, d: int, seed: int) -> np.ndarray:
    """Dense Gram K[a, i, b, j] = J_a(x_i) . J_b(x_j) of a random Jacobian (c, n, d)."""
    J = np.random.default_rng(seed).standard_normal((c, n, d))
    return np.einsum("aip,bjp->aibj", J, J)


def gram_block(K: np.ndarray, B: int, I: int, J: int) -> np.ndarray:
    return K[:, I * B:(I + 1) * B, :, J * B:(J + 1) * B]


def write_tiles_worker(path: str, tiles: list, c: int, n: int, d: int, seed: int, B: int,
                       barrier=None) -> None:
    K = expected_gram(c, n, d, seed)
    w = TileWriter(path)
    if barrier is not None:
        barrier.wait(30)  # all writers start together
    for I, J in tiles:
        write_gram_tile(w, I, J, gram_block(K, B, I, J))


class _HangingWriter(TileWriter):
    """Hangs (to be SIGKILLed) right after the data chunk of ``target`` is written."""

    target: tuple = ()
    ready: str = ""

    def _write_checksum(self, index, value):
        if tuple(index) == self.target:
            Path(self.ready).touch()
            time.sleep(60)
        super()._write_checksum(index, value)


def hanging_worker(path, tiles, target, ready, c, n, d, seed, B) -> None:
    K = expected_gram(c, n, d, seed)
    w = _HangingWriter(path)
    w.target, w.ready = tuple(target), ready
    for I, J in tiles:
        write_gram_tile(w, I, J, gram_block(K, B, I, J))


class CountingWriter(TileWriter):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.written: list = []

    def _write_data(self, region, block):
        self.written.append(region)
        super()._write_data(region, block)


def gram_store(path, c=2, n=23, B=4, fp=None, dtype="float64") -> StoreSpec:
    spec = StoreSpec.gram(c, n, B, dtype=dtype, fingerprint=fp or FP, meta={"variant": "regression"})
    create_or_validate(path, spec)
    return spec


def mp_context():
    """A forkserver that imports the heavy modules once: children start fast (no per-child
    torch import as with spawn) and are forked from a single-threaded process (unlike a
    plain fork of pytest, which runs zarr's I/O thread). Python 3.11's forkserver ignores
    the parent's sys.path, so only modules importable from the working directory preload;
    the others are imported by each child (slower, still correct)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["nngeo_dist.store", "pytest", __name__])
    return ctx


def chunk_file(store: Path, I: int, J: int) -> Path:
    # zarr v3 default chunk key encoding: data/c/<i0>/<i1>/<i2>/<i3>
    return store / "data" / "c" / "0" / str(I) / "0" / str(J)


# ---------------------------------------------------------------------------------------
# layout: create / validate / mismatch / exists
# ---------------------------------------------------------------------------------------
def test_create_records_spec_and_is_plain_zarr(tmp_path):
    p = tmp_path / "g.zarr"
    spec = gram_store(p, c=2, n=10, B=4)
    g = zarr.open_group(str(p), mode="r")
    assert g.attrs["complete"] is False
    assert g.attrs["fingerprint"] == FP
    assert g.attrs["kind"] == "gram" and g.attrs["shape"] == [2, 10, 2, 10]
    assert "library_version" in g.attrs and "library_version" in g.attrs["meta"]
    a = zarr.open_array(str(p / "data"), mode="r")
    assert a.shape == (2, 10, 2, 10) and a.chunks == (2, 4, 2, 4) and a.dtype == np.float64
    assert g["tiles_done"].shape == (3, 3) and g["tiles_done"].chunks == (1, 1)
    assert g["tiles_checksum"].chunks == (1, 1)
    stored = read_spec(p)
    assert stored.meta.pop("library_version")
    assert stored == spec
    jspec = StoreSpec.jacobian(3, 10, 7, B=4, D0=3)
    create_or_validate(tmp_path / "j.zarr", jspec)
    ja = zarr.open_group(str(tmp_path / "j.zarr"))["data"]
    assert ja.shape == (3, 10, 7) and ja.chunks == (3, 4, 3)
    assert jspec.tile_grid == (3, 3)


def test_mismatch_names_each_field(tmp_path):
    p = tmp_path / "g.zarr"
    gram_store(p, c=2, n=10, B=4)
    other = StoreSpec.gram(2, 10, 5, dtype="float32", fingerprint={**FP, "model": "m1"})
    with pytest.raises(StoreMismatchError) as ei:
        create_or_validate(p, other)
    msg = str(ei.value)
    assert "chunks: store has (2, 4, 2, 4), requested (2, 5, 2, 5)" in msg
    assert "dtype: store has 'float64', requested 'float32'" in msg
    assert "fingerprint['model']: store has 'm0', requested 'm1'" in msg
    assert "fingerprint['data']" not in msg
    assert "new path" in msg and "overwrite=True" in msg
    with pytest.raises(StoreMismatchError, match=r"shape: store has \(2, 10, 2, 10\), requested \(2, 11, 2, 11\)"):
        create_or_validate(p, StoreSpec.gram(2, 11, 4, fingerprint=FP))
    with pytest.raises(StoreMismatchError, match="meta\\['variant'\\]"):
        create_or_validate(p, StoreSpec.gram(2, 10, 4, fingerprint=FP, meta={"variant": "classif_logits"}))


def test_exists_resume_overwrite(tmp_path):
    p = tmp_path / "g.zarr"
    spec = gram_store(p, c=1, n=10, B=4)
    K = expected_gram(1, 10, 3, 0)
    w = TileWriter(p)
    write_gram_tile(w, 0, 1, gram_block(K, 4, 0, 1))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        create_or_validate(p, spec, resume=False)
    create_or_validate(p, spec)  # resume: same spec -> reused, done tiles kept
    assert TileWriter(p).done_tiles() == {(0, 1), (1, 0)}
    new = StoreSpec.gram(1, 10, 4, fingerprint={**FP, "model": "m9"})
    create_or_validate(p, new, overwrite=True)
    assert TileWriter(p).done_tiles() == set()
    assert read_spec(p).fingerprint["model"] == "m9"
    assert float(np.abs(to_dask(p, allow_incomplete=True).compute()).max()) == 0.0


# ---------------------------------------------------------------------------------------
# tiles: concurrency, kill safety, resume, verification
# ---------------------------------------------------------------------------------------
def test_concurrent_writer_processes(tmp_path):
    c, n, d, B, seed = 2, 23, 5, 4, 1  # 23 = 5*4 + 3: last tile smaller
    p = tmp_path / "g.zarr"
    gram_store(p, c=c, n=n, B=B)
    tiles = gram_tiles(n, B)
    assert len(tiles) == 21 and (5, 5) in tiles and all(i <= j for i, j in tiles)
    random.Random(0).shuffle(tiles)
    ctx = mp_context()
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=write_tiles_worker, args=(str(p), tiles[r::3], c, n, d, seed, B, barrier))
             for r in range(3)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
        assert pr.exitcode == 0
    K = expected_gram(c, n, d, seed)
    w = TileWriter(p)
    assert w.pending_tiles() == [] and len(w.done_tiles()) == 36
    np.testing.assert_array_equal(to_dask(p, allow_incomplete=True).compute(), K)
    np.testing.assert_array_equal(zarr.open_array(str(p / "data"))[...], K)
    assert w.mark_complete()
    assert zarr.open_group(str(p)).attrs["complete"] is True
    assert verify(p).ok and verify(p).n_checked == 36


def test_killed_writer_then_resume(tmp_path):
    c, n, d, B, seed = 2, 23, 5, 4, 2
    p = tmp_path / "g.zarr"
    gram_store(p, c=c, n=n, B=B)
    tiles = gram_tiles(n, B)
    random.Random(1).shuffle(tiles)
    m = next(i for i in range(7, len(tiles)) if tiles[i][0] != tiles[i][1])
    target = tiles[m]  # off-diagonal; killed after its (I, J) data chunk is written
    ready = str(tmp_path / "ready")
    ctx = mp_context()
    pr = ctx.Process(target=hanging_worker, args=(str(p), tiles, target, ready, c, n, d, seed, B))
    pr.start()
    t0 = time.time()
    while not os.path.exists(ready):
        assert time.time() - t0 < 60 and pr.is_alive()
        time.sleep(0.02)
    os.kill(pr.pid, signal.SIGKILL)
    pr.join(10)
    assert pr.exitcode == -signal.SIGKILL

    K = expected_gram(c, n, d, seed)
    finished = tiles[:m]
    w = TileWriter(p)
    expect_done = {t for I, J in finished for t in ((I, J), (J, I))}
    expect_done.add(target[::-1])  # the transposed half is written and marked before (I, J)
    assert w.done_tiles() == expect_done
    assert target not in w.done_tiles()
    assert chunk_file(p, *target).exists()  # its data was on disk, yet it is not done
    assert set(w.pending_tiles()) == set(tiles) - set(finished)
    assert verify(p).ok
    with pytest.raises(IncompleteStoreError, match=r"\d+ of 36 tiles"):
        to_dask(p)
    with pytest.raises(IncompleteStoreError, match="not written"):
        w.mark_complete()

    finished_chunks = {t for I, J in finished for t in ((I, J), (J, I))}
    mtimes = {t: chunk_file(p, *t).stat().st_mtime_ns for t in finished_chunks}
    rw = CountingWriter(p)
    pending = rw.pending_tiles(tiles)
    for I, J in pending:
        write_gram_tile(rw, I, J, gram_block(K, B, I, J))
    assert len(pending) == len(tiles) - m
    n_chunks = sum(1 if I == J else 2 for I, J in pending)
    assert len(rw.written) == n_chunks  # finished tiles were not rewritten
    assert {t: chunk_file(p, *t).stat().st_mtime_ns for t in finished_chunks} == mtimes
    rw.mark_complete()
    np.testing.assert_array_equal(to_dask(p).compute(), K)
    assert verify(p).ok


def test_verify_detects_tampering(tmp_path):
    c, n, d, B = 1, 10, 4, 4
    p = tmp_path / "g.zarr"
    gram_store(p, c=c, n=n, B=B)
    K = expected_gram(c, n, d, 3)
    w = TileWriter(p)
    for I, J in gram_tiles(n, B):
        write_gram_tile(w, I, J, gram_block(K, B, I, J))
    assert verify(p).ok
    a = zarr.open_array(str(p / "data"), mode="r+")
    a[0, 5, 0, 9] = a[0, 5, 0, 9] + 1e-12  # tile (1, 2)
    chunk_file(p, 0, 0).write_bytes(b"garbage")  # tile (0, 0): no longer decodes
    rep = verify(p)
    assert not rep.ok and sorted(rep.changed) == [(0, 0), (1, 2)]
    assert "changed" in str(rep)


def test_disk_full_message(tmp_path, monkeypatch):
    p = tmp_path / "g.zarr"
    gram_store(p, c=1, n=8, B=4)
    K = expected_gram(1, 8, 3, 0)
    w = TileWriter(p)
    write_gram_tile(w, 0, 0, gram_block(K, 4, 0, 0))

    def full(region, block):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w, "_write_data", full)
    with pytest.raises(StoreDiskFullError) as ei:
        write_gram_tile(w, 0, 1, gram_block(K, 4, 0, 1))
    msg = str(ei.value)
    assert "disk full" in msg and str(p) in msg and "stay valid" in msg and "--resume" in msg
    assert ei.value.errno == errno.ENOSPC
    assert w.done_tiles() == {(0, 0)}


def test_block_shape_checked(tmp_path):
    p = tmp_path / "g.zarr"
    gram_store(p, c=1, n=10, B=4)
    w = TileWriter(p)
    assert w.tile_shape((2, 2)) == (1, 2, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        w.write_tile((2, 2), np.zeros((1, 4, 1, 4)))
    with pytest.raises(IndexError):
        w.write_tile((3, 0), np.zeros((1, 4, 1, 4)))


# ---------------------------------------------------------------------------------------
# views and streaming linear algebra
# ---------------------------------------------------------------------------------------
@pytest.fixture
def psd_gram_store(tmp_path):
    """Complete Gram store (c=2, n=37, B=8) of K = G G^T with a decaying spectrum."""
    c, n, B, d = 2, 37, 8, 60
    rng = np.random.default_rng(5)
    G = rng.standard_normal((c * n, d)) * (0.85 ** np.arange(d))[None, :]
    M = G @ G.T
    K = M.reshape(c, n, c, n)
    p = tmp_path / "psd.zarr"
    gram_store(p, c=c, n=n, B=B)
    w = TileWriter(p)
    for I, J in gram_tiles(n, B):
        write_gram_tile(w, I, J, gram_block(K, B, I, J))
    w.mark_complete()
    return p, K, M


def test_views(psd_gram_store):
    p, K, M = psd_gram_store
    x = to_dask(p)
    assert x.chunks[1] == (8, 8, 8, 8, 5) and x.chunksize == (2, 8, 2, 8)
    xa = to_xarray(p)
    assert xa.dims == ("output_a", "example_i", "output_b", "example_j")
    assert xa.attrs["fingerprint"] == FP
    np.testing.assert_array_equal(xa.isel(output_a=1, output_b=0).values, K[1, :, 0, :])
    np.testing.assert_array_equal(zarr.open_group(str(p), mode="r")["data"][...], K)


def test_incomplete_refused(tmp_path):
    p = tmp_path / "g.zarr"
    gram_store(p, c=1, n=10, B=4)
    with pytest.raises(IncompleteStoreError, match="9 of 9 tiles are not written.*allow_incomplete=True"):
        to_xarray(p)
    assert to_xarray(p, allow_incomplete=True).shape == (1, 10, 1, 10)


def test_gram_streaming_ops(psd_gram_store):
    p, K, M = psd_gram_store
    x = to_dask(p)
    v = np.random.default_rng(0).standard_normal(M.shape[0])
    np.testing.assert_allclose(gram_mv(x, v), M @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gram_mv(x, v.reshape(2, 37)), (M @ v).reshape(2, 37), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gram_diag(x).compute(), np.diag(M).reshape(2, 37), rtol=1e-14)
    assert gram_trace(x) == pytest.approx(np.trace(M), rel=1e-12)
    assert frobenius(x) == pytest.approx(np.linalg.norm(M), rel=1e-12)
    Nm = normalised_gram(x).compute().reshape(M.shape)
    dg = np.sqrt(np.diag(M))
    np.testing.assert_allclose(Nm, M / dg[:, None] / dg[None, :], rtol=1e-12)


def test_top_eigenpairs_match_eigh(psd_gram_store):
    p, K, M = psd_gram_store
    ref_w, ref_U = np.linalg.eigh(M)
    ref_w, ref_U = ref_w[::-1], ref_U[:, ::-1]
    w, U = top_eigenpairs(to_dask(p), k=5, n_power_iter=4, seed=0)
    assert w.shape == (5,) and U.shape == (74, 5)
    np.testing.assert_allclose(w, ref_w[:5], rtol=1e-8)
    w0, _ = top_eigenpairs(to_dask(p), k=5, n_power_iter=0, seed=0)
    assert np.max(np.abs(w0 - ref_w[:5]) / ref_w[:5]) > 1e-6  # the power iterations matter here
    assert np.all(np.diff(w) <= 0)
    np.testing.assert_allclose(np.abs(np.sum(U * ref_U[:, :5], axis=0)), 1.0, atol=1e-8)
    proj = kernel_pca(to_dask(p), k=2)
    np.testing.assert_allclose(np.abs(proj), np.abs(ref_U[:, :2] * np.sqrt(ref_w[:2])), atol=1e-8)
    # centred kernel PCA == eigen-decomposition of H M H
    H = np.eye(74) - 1.0 / 74
    cw, cU = np.linalg.eigh(H @ M @ H)
    cproj = kernel_pca(to_dask(p), k=2, center=True)
    np.testing.assert_allclose(np.abs(cproj), np.abs(cU[:, ::-1][:, :2] * np.sqrt(cw[::-1][:2])), atol=1e-7)


def test_jacobian_store_mv_rmv(tmp_path):
    c, n, d, B, D0 = 3, 11, 10, 4, 4  # n and d not multiples of the chunk sizes
    Jd = np.random.default_rng(4).standard_normal((c, n, d))
    p = tmp_path / "jac.zarr"
    create_or_validate(p, StoreSpec.jacobian(c, n, d, B=B, D0=D0, fingerprint=FP))
    w = TileWriter(p)
    tiles = w.all_tiles()
    assert len(tiles) == 9
    random.Random(3).shuffle(tiles)
    for t in tiles:
        w.write_tile(t, Jd[w.tile_region(t)])
    w.mark_complete()
    assert verify(p).ok
    x = to_dask(p)
    assert x.chunksize == (3, 4, 4)
    v = np.random.default_rng(1).standard_normal(d)
    u = np.random.default_rng(2).standard_normal((c, n))
    np.testing.assert_allclose(jac_mv(x, v), Jd @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jac_rmv(x, u), np.einsum("aip,ai->p", Jd, u), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jac_rmv(p, u.reshape(-1)), np.einsum("aip,ai->p", Jd, u), rtol=1e-12)
    xa = to_xarray(p)
    assert xa.dims == ("output", "example", "parameter") and xa.shape == (c, n, d)


def test_torch_blocks_and_fsspec_url(tmp_path):
    torch = pytest.importorskip("torch")
    url = f"memory://nngeo-{os.getpid()}/g.zarr"
    spec = StoreSpec.gram(1, 6, 4, dtype=torch.float32, fingerprint=FP)
    assert spec.dtype == "float32"
    create_or_validate(url, spec)
    K = expected_gram(1, 6, 3, 0).astype(np.float32)
    w = TileWriter(url)
    for I, J in gram_tiles(6, 4):
        write_gram_tile(w, I, J, torch.from_numpy(np.ascontiguousarray(gram_block(K, 4, I, J))))
    w.mark_complete()
    np.testing.assert_array_equal(to_dask(url).compute(), K)
    assert verify(url).ok
    fp = tmp_path / "f.zarr"
    create_or_validate(f"file://{fp}", spec)
    assert zarr.open_group(str(fp), mode="r").attrs["kind"] == "gram"
