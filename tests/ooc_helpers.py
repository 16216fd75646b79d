"""Shared pieces of the out-of-core tests (tests/test_ooc_*.py): a small float64 model and
data set, and the functions each rank (or dask worker) runs. Module level, so that spawned
processes can import them."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# imported here so that the test harness's forkserver preloads them (faster rank start-up)
import nngeo_dist  # noqa: F401
import nngeo_dist.object.stored  # noqa: F401
import nngeo_dist.store.gram  # noqa: F401
import nngeo_dist.store.jacobian  # noqa: F401

N, FEATURES, C = 23, 6, 3


def make_model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, C))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return model.double().eval()


def make_data(n: int = N, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(n: int = N, batch_size: int = 4) -> DataLoader:
    return DataLoader(make_data(n), batch_size=batch_size)


def loader_dropping(k: int, batch_size: int = 4) -> DataLoader:
    """A loader over :func:`make_data` whose collate_fn drops example ``k`` (a faulty one)."""
    data = make_data()
    dropped = data[k][0]

    def collate(examples):
        kept = [e for e in examples if not torch.equal(e[0], dropped)]
        return torch.utils.data.default_collate(kept)

    return DataLoader(data, batch_size=batch_size, collate_fn=collate)


def dense_gram(outputs=None, n: int = N) -> torch.Tensor:
    """In-memory reference: GramMatrix (FMatDense) of the selected outputs."""
    from nngeo_dist import GramMatrix
    from nngeo_dist.store.job import select_outputs

    model = make_model()
    fn = select_outputs(lambda x, y: model(x), outputs)
    return GramMatrix(model, make_loader(n), function=fn).to_torch()


def read_store(path: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(path, mode="r")["data"][...])


# ---------------------------------------------------------------- run inside each rank
def rank_gram(rank: int, world: int, path: str, tile: int, tile_log: str, outputs=None, n: int = N) -> dict:
    from nngeo_dist import GramMatrix
    from nngeo_dist.object.stored import FMatStored

    torch.set_num_threads(1)
    model = make_model()
    # every rank passes the loader over the whole data set (a shard's loader works too)
    K = GramMatrix(model, make_loader(n), representation=FMatStored, store=path, tile=tile,
                   outputs=outputs, tile_log=tile_log, progress=False)
    rep = K.report
    return {"computed": rep.computed, "all": rep.tiles_computed_all, "total": rep.tiles_total,
            "trace": float(K.trace())}


def rank_gram_sharded_loader(rank: int, world: int, path: str, tile: int) -> int:
    """The loader given is this rank's shard: only its dataset is used."""
    from nngeo_dist import GramMatrix
    from nngeo_dist.dist import shard_loader
    from nngeo_dist.object.stored import FMatStored

    torch.set_num_threads(1)
    loader = shard_loader(make_data(), batch_size=3)
    K = GramMatrix(make_model(), loader, representation=FMatStored, store=path, tile=tile, progress=False)
    return K.report.tiles_computed


def rank_jacobian(rank: int, world: int, path: str, tile: int, d_chunk: int, tile_log: str) -> list:
    from nngeo_dist import Jacobian
    from nngeo_dist.object.stored import PushForwardStored

    torch.set_num_threads(1)
    J = Jacobian(make_model(), make_loader(), representation=PushForwardStored, store=path, tile=tile,
                 d_chunk=d_chunk, tile_log=tile_log, progress=False)
    return J.report.computed


def rank_refused(rank: int, world: int, path: str, tile: int) -> str:
    """A job with another model on an existing store: every rank must raise."""
    from nngeo_dist import GramMatrix
    from nngeo_dist.object.stored import FMatStored

    try:
        GramMatrix(make_model(seed=7), make_loader(), representation=FMatStored, store=path, tile=tile,
                   progress=False)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def warm_worker() -> bool:
    """Import what a dask worker needs (run early, while the test does other work)."""
    import nngeo_dist.store.engine_dask  # noqa: F401

    return True
