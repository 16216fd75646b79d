"""CUDA + NCCL readiness, checked on cpu + gloo.

These machines have no GPU, so each test stands in for the device with what the cpu can
show: a recorded clock, a stand-in device ("meta") for a rank's cuda device or a model's
device, a bfloat16 tensor. Each test fails if its fix is reverted:

- the capturer's choice between its two backward routes is timed with the clock that
  waits for the device's queued kernels (on cuda, a bare perf_counter times launches);
- ``broadcast_tensor`` returns a cpu tensor on the cpu on every rank (under NCCL the other
  ranks used to get it on their cuda device while the source kept it on the cpu);
- the store-backed objects return results on the device of the vector they answer, else
  on the model's device (they were always on the cpu);
- a bfloat16 result (a bf16 model on a GPU) can be written to a store and read as numpy.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nngeo_dist import FIM, GramMatrix
from nngeo_dist.generator import capture
from nngeo_dist.object import PMatDiag
from nngeo_dist.object.stored import PMatLowRankStored
from nngeo_dist.object.vector import FVector, PVector
from nngeo_dist.store.tiles import as_numpy

try:
    from dist_harness import run_ranks
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import run_ranks

STAND_IN = torch.device("meta")  # a device other than the cpu, for where results go


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _loader(dtype=torch.float64, n: int = 10) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g).to(dtype)), batch_size=4)


# ---------------------------------------------------------------- timed route choices


def test_backward_route_choice_times_with_the_device_clock(monkeypatch):
    """The first batch times the vectorised backward against the looped one; on cuda the
    clock must synchronise the device (layers._clock), else only kernel launches count."""
    seen = []
    real = capture._clock

    def clock(device):
        seen.append(torch.device(device))
        return real(device)

    monkeypatch.setattr(capture, "_clock", clock)
    model = _model()
    capture._BACKWARD_CHOICE.pop(model, None)
    FIM(model, _loader(), PMatDiag, progress=False)  # classif_logits: 2 outputs, a choice
    assert capture._BACKWARD_CHOICE[model] in (True, False)
    assert len(seen) == 6 and set(seen) == {torch.device("cpu")}


# ---------------------------------------------------------------- broadcast_tensor


def _on_broadcast_tensor(rank, world):
    from nngeo_dist.dist import reduce

    # every rank could use a cuda device (a CUDA-capable job); the tensor is on the cpu
    reduce.device_for_rank = lambda: STAND_IN
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3) + 10 if rank == 1 else None
    out = reduce.broadcast_tensor(t, src=1)
    return str(out.device), out


def test_broadcast_tensor_keeps_a_cpu_tensor_on_the_cpu_everywhere():
    want = torch.arange(6, dtype=torch.float64).reshape(2, 3) + 10
    for device, value in run_ranks(_on_broadcast_tensor, 3):
        assert device == "cpu"
        assert torch.equal(value, want)


# ---------------------------------------------------------------- store-backed results


@pytest.fixture(scope="module")
def gram_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "g.zarr"
    return GramMatrix(_model(), _loader(), store=str(path), tile=4, progress=False)


@pytest.fixture(scope="module")
def lowrank_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("dev") / "lr.zarr"
    return FIM(_model(), _loader(), PMatLowRankStored, store=str(path), tile=4, progress=False)


def _model_elsewhere():
    """A generator stand-in: the object's model on another device than the cpu."""
    return types.SimpleNamespace(device=STAND_IN)


def test_gram_store_results_on_the_vector_and_model_device(gram_store):
    K = gram_store
    c, n = K.c, K.n
    v = FVector(torch.ones(c, n, dtype=torch.float64))
    assert K.mv(v).get_flat_representation().device == v.get_flat_representation().device
    assert K.vTMv(v).device.type == "cpu"
    assert K.trace().dtype == K.dtype
    generator = K.generator
    try:
        K.generator = _model_elsewhere()
        assert K.trace().device == STAND_IN
        assert K.frobenius_norm().device == STAND_IN
        assert K.get_diag().device == STAND_IN
        assert K.to_torch().device == STAND_IN
        assert K.mv(v).get_flat_representation().device.type == "cpu"  # the vector's device
        assert K.vTMv(v).device.type == "cpu"
    finally:
        K.generator = generator


def test_lowrank_store_results_on_the_vector_and_model_device(lowrank_store):
    M = lowrank_store
    v = PVector(M.layer_collection, vector_repr=torch.ones(M.layer_collection.numel(),
                                                            dtype=torch.float64))
    generator = M.J.generator
    try:
        M.J.generator = _model_elsewhere()
        assert M.trace().device == STAND_IN
        assert M.get_diag().device == STAND_IN
        assert M.frobenius_norm().device == STAND_IN
        assert M.to_torch().device == STAND_IN
        assert M.mv(v).to_torch().device.type == "cpu"
        assert M.vTMv(v).device.type == "cpu"
    finally:
        M.J.generator = generator
    assert M.trace().device.type == "cpu"  # its model's device
    assert PMatLowRankStored(M.layer_collection, M.store).trace().device.type == "cpu"  # none


# ---------------------------------------------------------------- bfloat16 (GPU models)


def test_bfloat16_results_become_numpy_exactly():
    t = torch.tensor([1.5, -2.25, 3.0e-3], dtype=torch.bfloat16)
    x = as_numpy(t, dtype="float32")
    assert x.dtype.name == "float32" and torch.equal(torch.from_numpy(x), t.float())


def test_bfloat16_model_gram_store(tmp_path):
    model, loader = _model(torch.bfloat16), _loader(torch.bfloat16)
    K = GramMatrix(model, loader, store=str(tmp_path / "g.zarr"), tile=4, dtype="float32",
                   progress=False)
    dense = GramMatrix(model.float(), _loader(torch.float32)).to_torch()
    assert K.to_torch().dtype == torch.float32
    assert torch.allclose(K.to_torch(), dense, rtol=0.1, atol=0.1)
    v = FVector(torch.ones(K.c, K.n, dtype=torch.bfloat16))
    assert torch.isfinite(K.mv(v).get_flat_representation()).all()
