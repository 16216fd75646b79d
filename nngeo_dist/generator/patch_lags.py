"""The sum of a stride-1 convolution's patch outer products, from lags instead of patches.

For a convolution with stride 1, the patch of output position ``t`` holds, at kernel offset
``u`` (per spatial dim), the input ``x[t + u dl - lo]`` (``dl`` the dilation, ``lo`` the
padding before). So entry ``((c, u), (c', u'))`` of ``A = sum_n sum_t p p^T`` is

    sum_n  sum_{s in B(u)}  x[n, c, s] x[n, c', s + (u' - u) dl]

with ``B(u)`` the input positions that offset ``u`` reads (a box). Over a fixed set of
positions ``s`` this sum depends on the lag ``u' - u`` only (block-Toeplitz): one call to
the convolution's weight gradient, with ``x`` as its own output gradient, gives all
``(2k - 1)^d`` lags, ``C^2 (2k-1)^d`` products per position against the ``C^2 k^(2d)`` of
the patches' product (25 against 81 for a 3x3 kernel), and never forms the patches.

The boxes of different offsets differ only near the edges. So the input positions are cut
into *regions* (per dim, segments between the boxes' ends: for a 3x3 'same' kernel, the
interior, four edge strips and four corners), each region's lag sums are taken once, and
each offset adds up those of the regions inside its box.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: the convolution's weight gradient, per number of spatial dims
WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}


@dataclass(frozen=True)
class LagPlan:
    """What depends on the shapes only.

    ``regions``: the cells of the input positions, per spatial dim a (start, stop) range;
    ``same_shape``: the regions grouped by shape (one call per group); ``inside``
    (U, regions): 1 where the region lies in offset u's box; ``lag_index`` (U, U): per
    offset pair (u, u'), the flat index of the lag u' - u; ``out_size``: output positions.
    """

    regions: tuple
    same_shape: tuple
    inside: Tensor
    lag_index: Tensor
    out_size: tuple


def _box(size: int, start: int, length: int) -> tuple:
    """The box [start, start + length) clipped to [0, size)."""
    a = min(max(start, 0), size)
    return a, max(a, min(start + length, size))


def _segments(size: int, boxes: list) -> list:
    """[0, size) cut at every box end."""
    cuts = sorted({0, size} | {e for box in boxes for e in box})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


@functools.lru_cache(maxsize=64)
def lag_plan(size: tuple, kernel_size: tuple, dilation: tuple, padding: tuple) -> LagPlan:
    """The plan for inputs of spatial ``size`` and a stride-1 kernel; ``padding``: (lo, hi)
    per spatial dim."""
    dims = len(size)
    out = tuple(s + lo + hi - (k - 1) * dl for s, (lo, hi), k, dl in zip(size, padding, kernel_size, dilation))
    # per dim and kernel offset, the input positions it reads
    boxes = [[_box(size[d], u * dilation[d] - padding[d][0], out[d]) for u in range(kernel_size[d])]
             for d in range(dims)]
    regions = list(itertools.product(*(_segments(size[d], boxes[d]) for d in range(dims))))
    offsets = list(itertools.product(*(range(k) for k in kernel_size)))
    inside = torch.tensor([[float(all(boxes[d][u[d]][0] <= r[d][0] and r[d][1] <= boxes[d][u[d]][1]
                                      for d in range(dims))) for r in regions] for u in offsets],
                          dtype=torch.float64)
    lags = [2 * k - 1 for k in kernel_size]
    lag_index = torch.tensor([[sum((v[d] - u[d] + kernel_size[d] - 1) * math.prod(lags[d + 1:]) for d in range(dims))
                               for v in offsets] for u in offsets], dtype=torch.long)
    shapes: dict = {}
    for j, r in enumerate(regions):
        shapes.setdefault(tuple(b - a for a, b in r), []).append(j)
    return LagPlan(tuple(regions), tuple(map(tuple, shapes.values())), inside, lag_index, out)


def pad_list(pads) -> list:
    """(before, after) per spatial dim -> an ``F.pad`` list (last dim first)."""
    return [p for pair in reversed(list(pads)) for p in pair]


def _slab(x: Tensor, box: tuple) -> Tensor:
    return x[(slice(None), slice(None), *(slice(a, b) for a, b in box))]


def _window(x: Tensor, box: tuple, reach: list) -> Tensor:
    """The input every position of ``box`` reads at some lag: ``box`` widened by ``reach``
    on both sides, zeros outside ``x``."""
    size = x.shape[2:]
    lo = [a - r for (a, _), r in zip(box, reach)]
    hi = [b + r for (_, b), r in zip(box, reach)]
    inner = _slab(x, tuple((max(l, 0), min(h, s)) for l, h, s in zip(lo, hi, size)))
    return F.pad(inner, pad_list([(max(-l, 0), max(h - s, 0)) for l, h, s in zip(lo, hi, size)]))


def _lag_sums(x: Tensor, plan: LagPlan, reach: list, dilation: tuple) -> Tensor:
    """(regions, C, C, *(2k - 1)): per region of the plan, sum_n sum_{s in region} of
    x[n, c, s] x[n, c', s + (j - (k - 1)) dl] for each lag j."""
    dims = x.dim() - 2
    C = x.shape[1]
    lag_shape = tuple(2 * r // dl + 1 for r, dl in zip(reach, dilation))
    out = x.new_empty((len(plan.regions), C, C) + lag_shape)
    for members in plan.same_shape:
        regions = [plan.regions[j] for j in members]
        m = len(members)
        ins = [_window(x, r, reach) for r in regions]  # (N, C, *window) each
        outs = [_slab(x, r) for r in regions]  # (N, C, *region) each
        if all(b - a == 1 for a, b in regions[0]):
            # single positions: plain products, (m, C, N) x (m, N, C L)
            taps = torch.stack(ins)[(Ellipsis, *(slice(None, None, dl) for dl in dilation))]
            lag = torch.bmm(torch.stack(outs).flatten(2).transpose(1, 2), taps.flatten(2))
        else:
            # one call for the group, each region its own group of channels
            ins = ins[0] if m == 1 else torch.cat(ins, 1)
            outs = outs[0] if m == 1 else torch.cat(outs, 1)
            flip = dims == 2 and outs.shape[-1] < outs.shape[-2]  # the kernels prefer wide rows
            if flip:
                ins, outs = ins.transpose(-1, -2), outs.transpose(-1, -2)
            lag = WEIGHT_GRAD[dims](ins, (m * C, C) + (lag_shape[::-1] if flip else lag_shape), outs,
                                     dilation=dilation[::-1] if flip else dilation, groups=m)
            if flip:
                lag = lag.transpose(-1, -2)
        out[list(members)] = lag.reshape((m, C, C) + lag_shape)
    return out


def patch_products(x: Tensor, kernel_size: tuple, dilation: tuple, padding: tuple, bias: bool) -> Tensor:
    """``(i', i')`` sum over examples and output positions of ``p p^T`` for the stride-1
    patches of ``x`` ``(N, C, *size)`` (1 or 2 spatial dims), ``i = C prod(kernel_size)`` in
    the weight's ``(C, *kernel)`` order, then (``bias``) a trailing 1: the last row holds
    the patches' sums and the example-position count. ``padding``: (lo, hi) per dim."""
    N, C, size = x.shape[0], x.shape[1], tuple(x.shape[2:])
    plan = lag_plan(size, tuple(kernel_size), tuple(dilation), tuple(map(tuple, padding)))
    reach = [(k - 1) * dl for k, dl in zip(kernel_size, dilation)]
    sums = _lag_sums(x, plan, reach, tuple(dilation)).flatten(1)
    U = plan.lag_index.shape[0]
    per_offset = (plan.inside.to(x.device, x.dtype) @ sums).view(U, C, C, -1)
    rows = torch.arange(U, device=x.device).unsqueeze(1).expand(U, U)
    blocks = per_offset[rows, :, :, plan.lag_index.to(x.device)]  # (U, U, C, C): [u, u', c, c']
    A = blocks.permute(2, 0, 3, 1).reshape(C * U, C * U)
    A = (A + A.t()) / 2  # the two halves are the same sums, rounded apart
    if not bias:
        return A
    # sum over positions of each patch entry: the weight gradient of an all-ones output
    total = x.sum(dim=0, keepdim=True)
    padded = F.pad(total, pad_list(padding))
    ones = x.new_ones((1, 1) + plan.out_size)
    s = WEIGHT_GRAD[x.dim() - 2](padded, (1, C, *kernel_size), ones, dilation=dilation).reshape(-1)
    out = x.new_empty(C * U + 1, C * U + 1)
    out[:-1, :-1] = A
    out[-1, :-1] = s
    out[:-1, -1] = s
    out[-1, -1] = N * math.prod(plan.out_size)
    return out
