"""A convolution's patches: KFAC's input factor of a stride-1 convolution from lags
(nngeo_dist.generator.patch_lags), and the patches themselves in both layouts the kernels
read (the batch's columns, and chunks of examples built into one reused buffer).

Oracle: the patches built here with ``F.pad`` + ``F.unfold`` (torch's own im2col, no code
of ours), A = sum over examples and positions of p p^T; and, end to end, nngeometry 0.4's
KFAC on the zoo's convolutions with the kernel's route forced either way.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checks import rel
from models import loader_of, make, variant_of
from nngeo_dist import FIM
from nngeo_dist.generator import layers
from nngeo_dist.generator.patch_lags import lag_plan, patch_products
from nngeo_dist.object import PMatKFAC
from test_kfac import f64, nngeometry_fim  # noqa: F401 - f64 is a fixture


def torch_padding(conv) -> list:
    """(lo, hi) per spatial dim, as torch pads: 'same' puts the odd one after."""
    dims = conv.weight.dim() - 2
    if conv.padding == "valid":
        return [(0, 0)] * dims
    if conv.padding == "same":
        total = [dl * (k - 1) for k, dl in zip(conv.kernel_size, conv.dilation)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in conv.padding]


def unfolded_patches(conv, x, bias: bool) -> torch.Tensor:
    """(N, T, i') patches from torch's unfold (1-d convolutions as 2-d with height 1),
    a trailing 1 for a bias."""
    pads = torch_padding(conv)
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    xp = F.pad(x, flat)
    if x.dim() == 3:
        xp, k, dl, st = xp[:, :, None], (1, conv.kernel_size[0]), (1, conv.dilation[0]), (1, conv.stride[0])
    else:
        k, dl, st = conv.kernel_size, conv.dilation, conv.stride
    p = F.unfold(xp, k, dilation=dl, stride=st).transpose(1, 2)
    if bias:
        p = torch.cat([p, torch.ones(*p.shape[:2], 1, dtype=p.dtype)], dim=2)
    return p


def unfolded_products(conv, x, bias: bool) -> torch.Tensor:
    """sum_n sum_t p p^T of :func:`unfolded_patches`."""
    p = unfolded_patches(conv, x, bias)
    p = p.reshape(-1, p.shape[-1])
    return p.t() @ p


CONVS = [
    nn.Conv2d(3, 4, 3, padding=1),
    nn.Conv2d(3, 4, 3, padding="same", dilation=2),
    nn.Conv2d(3, 4, (2, 3), padding="same"),  # even kernel: more padding after
    nn.Conv2d(3, 4, 5, padding="valid"),
    nn.Conv2d(3, 4, (3, 1), padding=(2, 0)),  # padding wider than the kernel's reach
    nn.Conv2d(3, 4, 1),
    nn.Conv2d(3, 4, 4, padding=3, dilation=(1, 2)),
    nn.Conv1d(3, 4, 3, padding=1),
    nn.Conv1d(3, 4, 4, padding="same", dilation=2),
    nn.Conv1d(3, 4, 5),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [5, 9])
@pytest.mark.parametrize("conv", CONVS, ids=repr)
def test_lag_products_equal_the_patches_products(conv, size, bias):
    conv = conv.double()
    x = torch.randn(5, 3, *([size + 1, size][: conv.weight.dim() - 2]), dtype=torch.float64)
    got = patch_products(x, conv.kernel_size, conv.dilation, torch_padding(conv), bias)
    assert rel(got, unfolded_products(conv, x, bias)) < 1e-12
    assert torch.equal(got, got.t())


def test_plan_regions_partition_the_input_and_each_offset_reads_its_box():
    # 3x3 'same' on 6x5: interior, four edge strips and four corners
    plan = lag_plan((6, 5), (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert sorted(plan.regions) == sorted(
        (r, c) for r in [(0, 1), (1, 5), (5, 6)] for c in [(0, 1), (1, 4), (4, 5)])
    # the top-left offset reads rows 0..4 and columns 0..3: every region but those of
    # the last row and the last column
    for (rows, cols), inside in zip(plan.regions, plan.inside[0].tolist()):
        assert inside == float(rows != (5, 6) and cols != (4, 5))
    assert plan.out_size == (6, 5)


@pytest.mark.parametrize("route", ["patches", "lags"])
@pytest.mark.parametrize("name", ["conv1d", "conv2d", "conv2d_dilation", "conv2d_nobias"])
def test_kfac_on_each_route_matches_nngeometry(name, route, monkeypatch, f64):
    """End to end: PMatKFAC with the input factor from the patches or from the lags
    equals nngeometry 0.4's KFAC (its factors from torch's unfold)."""
    def forced(key, routes, device):
        return routes[route]() if key[0] == "kfac_A" else next(iter(routes.values()))()

    monkeypatch.setattr(layers, "fastest", forced)
    model, batches, c = make(name)
    loader = loader_of(batches)
    variant = variant_of(c)
    ours = FIM(model, loader, PMatKFAC, variant=variant, progress=False).to_torch()
    assert rel(ours, nngeometry_fim(model, loader, "PMatKFAC", variant).to_torch()) < 1e-10


STRIDED = [nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(3, 4, (3, 2), stride=(2, 3), dilation=2),
           nn.Conv1d(3, 4, 3, stride=2, padding=2)]


@pytest.mark.parametrize("chunk_bytes", [1, 1000, 1 << 30])
@pytest.mark.parametrize("conv", CONVS + STRIDED, ids=repr)
def test_patch_chunks_and_columns_equal_torch_unfold(conv, chunk_bytes, monkeypatch):
    """Both layouts of a convolution's patches, the whole batch's columns (i', N, T) and
    the chunks of examples built into one reused buffer (n_s, i', T), against unfold."""
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", chunk_bytes)
    conv = conv.double()
    math = layers.layer_math_for(type(conv).__name__)
    x = torch.randn(7, 3, *([10, 9][: conv.weight.dim() - 2]), dtype=torch.float64)
    want = unfolded_patches(conv, x, bias=True)  # (N, T, i')
    assert torch.equal(math.patch_columns(conv, x).permute(1, 2, 0), want)
    covered = []
    for sl, p in math.patch_chunks(conv, x):
        assert torch.equal(p, want[sl].transpose(1, 2))  # checked now: the buffer is reused
        covered += range(x.shape[0])[sl]
    assert covered == list(range(x.shape[0]))
