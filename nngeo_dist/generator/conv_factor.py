"""KFC's input factor of a stride-1 convolution, without unfolding its input.

With stride 1, the patch entries at kernel offsets u and u' read the input at t + u dl and
t + u' dl; summed over the output grid t, their product depends only on the displacement
D = (u' - u) dl, except along the image's edges. So

    A[(c, u), (c', u')] = sum_n sum_{r in box(u)} x[n, c, r] x[n, c', r + D]

where box(u) is the part of the image that offset u reads: the whole image, less a strip
along an edge that the padding does not cover (x is zero outside the image). The image is
cut, per dimension, at every box edge. For each piece, one correlation (a convolution's
weight gradient, kernel 2k - 1) gives the sums for every displacement at once, and each
offset's box is a union of pieces.

Cost: about (2k - 1)^dims C^2 multiply-adds per position, against (k^dims C)^2 for the
patches' product (3x3: 25 C^2 against 81 C^2), in calls tuned for convolutions, and no
unfolded copy of the input.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}


def _boxes(size: int, kernel: int, dilation: int, left: int, out: int) -> list[tuple[int, int]]:
    """Per kernel offset u, the interval [lo, hi) of the image that u reads."""
    return [(max(0, u * dilation - left), min(size, u * dilation - left + out)) for u in range(kernel)]


def _pieces(size: int, boxes: list) -> list[tuple[int, int]]:
    """[0, size) cut at every box edge."""
    cuts = sorted({0, size} | {e for box in boxes for e in box})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def stride1_input_factor(x: Tensor, kernel: Sequence[int], dilation: Sequence[int],
                         pads: Sequence[int], out: Sequence[int], bias: bool) -> Tensor:
    """(i', i'): sum over examples and output positions of p p^T, p the patches of a
    stride-1 convolution over ``x`` (N, C, *L), in the weight's (C, *kernel) order, with
    a trailing 1 for a bias.

    ``pads``: the (left, right) padding per spatial dimension, ``F.pad`` order (last
    dimension first); ``out``: the output's spatial size.
    """
    dims = x.dim() - 2
    N, C, L = x.shape[0], x.shape[1], x.shape[2:]
    lefts = [pads[2 * (dims - 1 - d)] for d in range(dims)]
    boxes = [_boxes(L[d], kernel[d], dilation[d], lefts[d], out[d]) for d in range(dims)]
    reach = [(k - 1) * dl for k, dl in zip(kernel, dilation)]
    wide = F.pad(x, [r for d in reversed(range(dims)) for r in (reach[d], reach[d])])
    k2 = [2 * k - 1 for k in kernel]

    # per piece of the image: the correlations for every displacement, and the sums
    corr, sums = {}, {}
    for piece in itertools.product(*(_pieces(L[d], boxes[d]) for d in range(dims))):
        own = x[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in piece)]
        around = wide[(slice(None), slice(None)) + tuple(slice(a, b + 2 * r) for (a, b), r in zip(piece, reach))]
        corr[piece] = _WEIGHT_GRAD[dims](around, (C, C, *k2), own, stride=1, padding=0, dilation=tuple(dilation))
        sums[piece] = own.sum(dim=(0,) + tuple(range(2, dims + 2)))

    offsets = list(itertools.product(*(range(k) for k in kernel)))
    S, s = [], []
    for u in offsets:
        inside = [p for p in corr if all(boxes[d][u[d]][0] <= p[d][0] and p[d][1] <= boxes[d][u[d]][1] for d in range(dims))]
        S.append(sum((corr[p] for p in inside), x.new_zeros(C, C, *k2)))
        s.append(sum((sums[p] for p in inside), x.new_zeros(C)))
    S = torch.stack(S).flatten(3)  # (U, C, C, J): displacement j = u' - u + k - 1 per dim
    U = len(offsets)
    strides = [1] * dims
    for d in reversed(range(dims - 1)):
        strides[d] = strides[d + 1] * k2[d + 1]
    j = torch.tensor([[sum((v[d] - u[d] + kernel[d] - 1) * strides[d] for d in range(dims)) for v in offsets]
                      for u in offsets], device=x.device)
    blocks = S.permute(0, 3, 1, 2)[torch.arange(U, device=x.device)[:, None], j]  # (U, U, C, C)
    A = blocks.permute(2, 0, 3, 1).reshape(C * U, C * U)
    A = 0.5 * (A + A.t())  # both triangles from the same sums, up to rounding
    if not bias:
        return A
    b = torch.stack(s).t().reshape(-1)  # (C U,), C-major like the patches
    count = N
    for o in out:
        count *= o
    top = torch.cat([A, b[:, None]], dim=1)
    bottom = torch.cat([b, b.new_tensor([count])])[None]
    return torch.cat([top, bottom], dim=0)
