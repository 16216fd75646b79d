"""The dask engine (issue 5): the Gram store computed as a task graph on a dask.distributed
LocalCluster (2 worker processes, 1 thread each) equals the torchrun-engine store and the
in-memory GramMatrix (float64, 1e-10); one task per tile, each tile written once."""
from __future__ import annotations

import numpy as np
import pytest

import ooc_helpers as H
from nngeo_dist import GramMatrix
from nngeo_dist.object.stored import FMatStored
from nngeo_dist.store import gram_tiles
from nngeo_dist.store.job import read_tile_log

distributed = pytest.importorskip("distributed")


def test_dask_engine_equals_torchrun_engine(tmp_path):
    model = H.make_model()
    log = str(tmp_path / "tiles.log")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    try:
        with distributed.Client(cluster) as client:
            # the workers import torch and the library while this process computes references
            warm = [client.submit(H.warm_worker, workers=[w], pure=False) for w in cluster.workers.values()
                    for w in [w.worker_address]]
            dense = H.dense_gram()
            ref = GramMatrix(model, H.make_loader(), representation=FMatStored,
                             store=str(tmp_path / "t.zarr"), tile=5, progress=False)
            assert all(f.result() for f in warm)
            K = GramMatrix(model, H.make_loader(), representation=FMatStored, engine="dask",
                           client=client, store=str(tmp_path / "d.zarr"), tile=5, tile_log=log,
                           progress=False, torch_threads=1)
            workers = len(client.scheduler_info()["workers"])
    finally:
        cluster.close()
    assert workers == 2
    a, b = H.read_store(K.path), H.read_store(ref.path)
    assert float(np.abs(a - b).max()) <= 1e-10 * float(np.abs(b).max())
    assert float((K.to_torch() - dense).abs().max() / dense.abs().max()) < 1e-10
    tiles = [t for _, t in read_tile_log(log)]
    assert sorted(tiles) == gram_tiles(23, 5)  # one task per tile, each written once
    assert K.report.tiles_computed == 15 and K.verify().ok
    # resuming a complete store submits nothing (no cluster is even started)
    again = GramMatrix(model, H.make_loader(), representation=FMatStored, engine="dask",
                       store=K.path, tile=5, progress=False)
    assert again.report.tiles_computed == 0
