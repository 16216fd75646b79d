"""KFC's input factor of stride-1 convolutions from correlations of the input (no
unfolding): against the product of patches unfolded by ``F.unfold`` (Conv2d) or read off
the convolution itself (Conv1d), for every kind of padding, kernel and dilation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checks import rel
from nngeo_dist.generator.layers import layer_math_for

CONV2D = [
    nn.Conv2d(3, 4, 3, padding=1),
    nn.Conv2d(3, 4, 3),  # valid: every offset reads a different box
    nn.Conv2d(3, 4, 3, padding=3),  # more padding than 'same': rows read by no offset
    nn.Conv2d(3, 4, 3, padding=2, dilation=2),
    nn.Conv2d(3, 4, (2, 3), padding=(1, 0), dilation=(2, 1)),
    nn.Conv2d(2, 4, (1, 4), padding=(0, 1), bias=False),
    nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(1, 2)),  # asymmetric 'same'
]
CONV1D = [
    nn.Conv1d(3, 4, 3, padding=1),
    nn.Conv1d(3, 4, 5),
    nn.Conv1d(3, 4, 4, padding="same", dilation=2),
    nn.Conv1d(3, 4, 2, padding=4, bias=False),
]


def with_ones(p: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([p, torch.ones_like(p[:, :1])], dim=1) if bias else p


@pytest.mark.parametrize("conv", CONV2D, ids=repr)
def test_conv2d_input_factor_equals_unfolded_patches_product(conv):
    conv = conv.double()
    x = torch.randn(4, conv.in_channels, 6, 9, dtype=torch.float64)
    got = layer_math_for("Conv2d").kfac_A(conv, x)
    if isinstance(conv.padding, str):  # 'same': unfold the explicitly padded input
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        xp = F.pad(x, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2])
        p = F.unfold(xp, conv.kernel_size, conv.dilation, 0, 1)
    else:
        p = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, 1)
    p = with_ones(p.transpose(1, 2).reshape(-1, p.shape[1]), conv.bias is not None)
    assert rel(got, p.t() @ p) < 1e-12


@pytest.mark.parametrize("conv", CONV1D, ids=repr)
def test_conv1d_input_factor_equals_patches_product(conv):
    """Patches read off the convolution: the response to a one-hot weight is the input
    entry that weight multiplies."""
    conv = conv.double()
    x = torch.randn(5, conv.in_channels, 11, dtype=torch.float64)
    i = conv.in_channels * conv.kernel_size[0]
    eye = torch.eye(i, dtype=x.dtype).reshape(i, conv.in_channels, conv.kernel_size[0])
    p = F.conv1d(x, eye, None, 1, conv.padding, conv.dilation)  # (N, i, T)
    p = with_ones(p.transpose(1, 2).reshape(-1, i), conv.bias is not None)
    assert rel(layer_math_for("Conv1d").kfac_A(conv, x), p.t() @ p) < 1e-12


def test_strided_convolution_uses_the_patches():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    p = F.unfold(x, 3, 1, 1, 2)
    p = with_ones(p.transpose(1, 2).reshape(-1, 27), True)
    assert rel(layer_math_for("Conv2d").kfac_A(conv, x), p.t() @ p) < 1e-12
