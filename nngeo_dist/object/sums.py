"""Sums of squares in float32 that stay accurate on large tensors.

torch's norm kernels (``vector_norm``, ``matrix_norm``) and one BLAS dot over a large
float32 tensor accumulate in float32 (relative errors of 3e-3 and 4e-4 on a 6000 x 6000
matrix), and ``(t * t).sum()`` writes and reads back a temporary of t's size (most of its
time for a large t). Here a contiguous tensor is summed as dots of 2^18-entry pieces,
added in float64 (3e-7 on that matrix, faster than torch's norm), and other layouts
a chunk of rows at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


_HALF = (torch.float16, torch.bfloat16)

#: entries per float32-accumulated dot (its error grows with the length)
DOT_PIECE = 1 << 18


def sum_of_squares(t: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum t^2: over every entry (``dim=None``), or over the rows of a 2-d t (m, k)
    (``dim=0``: a (k,) result). Half-precision tensors are summed in float32 (their
    squares overflow float16 from 256, and its pieces' dots round), then rounded."""
    if t.dtype in _HALF:
        return sum_of_squares(t.float(), dim).to(t.dtype)
    if dim == 0:
        if t.dim() != 2:
            raise ValueError(f"dim=0 sums the rows of a 2-d tensor; got shape {tuple(t.shape)}")
        rows = t
    elif dim is None:
        if t.numel() == 0:  # e.g. a rank's (c, 0, d) rows
            return t.new_zeros(())
        if t.is_contiguous():
            flat = t.view(-1)
            if flat.numel() <= DOT_PIECE:  # one piece: no float64 pass (its overhead is the cost)
                return torch.dot(flat, flat)
            parts = torch.stack([torch.dot(p, p) for p in flat.split(DOT_PIECE)])
            return parts.to(torch.float64).sum().to(t.dtype)
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    else:
        raise ValueError(f"dim must be None or 0, got {dim}")
    step = max(1, (1 << 19) // max(1, rows.shape[1]))  # about 2 MB of float32 per chunk
    acc = None
    for chunk in rows.split(step):
        part = (chunk * chunk).sum(0)
        acc = part if acc is None else acc.add_(part)
    if acc is None:
        acc = rows.new_zeros(rows.shape[1])
    return acc.sum() if dim is None else acc


def l2_norm(t: Tensor) -> Tensor:
    """sqrt(sum t^2) over every entry (the Frobenius norm of a matrix), accurately; under
    autograd, torch's own norm (its backward is 0, not NaN, at t = 0)."""
    if t.requires_grad and torch.is_grad_enabled():
        return torch.linalg.vector_norm(t)
    if t.dtype in _HALF:  # the sum of squares may overflow where the norm does not
        return sum_of_squares(t.float()).sqrt().to(t.dtype)
    return sum_of_squares(t).sqrt()


__all__ = ["sum_of_squares", "l2_norm"]
