"""Moving data between ranks for row-sharded objects: rows gathered along any dimension,
sums delivered to one rank, and nested structures of tensors (per-layer Gram features,
input batches) broadcast from one rank to all.

Conventions are those of :mod:`nngeo_dist.dist.reduce`: ``group`` is resolved with
:func:`nngeo_dist.dist.group.resolve_group`; a single process issues no collective and
gets its input back; every rank of the group calls the same function in the same order;
tensors travel on :func:`nngeo_dist.dist.group.collective_device` (cuda for NCCL) and come
back on the caller's device (or the ``device`` asked for).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .agree import all_gather_ints
from .group import collective_device, global_rank, rank, resolve_group, world_size
from .reduce import _count_bytes, all_gather_tensors_varlen, broadcast_object

logger = logging.getLogger("nngeo_dist.dist")

# ---------------------------------------------------------------- rows along a dimension


def all_gather_rows(t: Tensor, dim: int = 0, group=None) -> Tensor:
    """Every rank's ``t`` concatenated along ``dim`` in rank order (sizes along ``dim`` may
    differ, zero included; the other dimensions must agree). Every rank gets the whole."""
    group = resolve_group(group)
    if world_size(group) == 1:
        return t
    moved = t.movedim(dim, 0)
    return all_gather_tensors_varlen(moved.contiguous(), group).movedim(0, dim)


def gather_rows(t: Tensor, dim: int = 0, dst: int = 0, group=None) -> Optional[Tensor]:
    """Like :func:`all_gather_rows` but only rank ``dst`` gets the whole (others: ``None``):
    for results too large to replicate. Uses ``dist.gather`` of zero-padded rows."""
    group = resolve_group(group)
    if world_size(group) == 1:
        return t
    moved = t.movedim(dim, 0).contiguous()
    counts = [g[0] for g in all_gather_ints([int(moved.shape[0])], group)]
    device = collective_device(group)
    padded = moved.new_zeros((max(counts), *moved.shape[1:]), device=device)
    padded[: moved.shape[0]] = moved.detach().to(device)
    is_dst = rank(group) == dst
    parts = [torch.empty_like(padded) for _ in counts] if is_dst else None
    dist.gather(padded, gather_list=parts, dst=global_rank(group, dst), group=group)
    if not is_dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device).movedim(0, dim)


def reduce_tensor(t: Tensor, dst: int = 0, group=None) -> Optional[Tensor]:
    """The sum of every rank's ``t`` (same shape and dtype everywhere) on rank ``dst``;
    other ranks get ``None``. ``t`` is not modified."""
    group = resolve_group(group)
    if world_size(group) == 1:
        return t
    buffer = t.detach().to(collective_device(group), copy=True).contiguous()
    dist.reduce(buffer, dst=global_rank(group, dst), op=dist.ReduceOp.SUM, group=group)
    _count_bytes(buffer.nbytes, buffer.nbytes)
    logger.debug("reduce_tensor: sent %d bytes to rank %d", buffer.nbytes, dst)
    return buffer.to(t.device) if rank(group) == dst else None


def broadcast_from(t: Optional[Tensor], src: int = 0, group=None, *, shape=None, dtype=None,
                   device=None) -> Tensor:
    """Rank ``src``'s ``t`` on every rank. When ``shape`` and ``dtype`` are known on every
    rank, no metadata travels (one broadcast); otherwise they are broadcast first.
    The result is on ``device`` (default: ``t``'s on src, the collective device elsewhere)."""
    group = resolve_group(group)
    if world_size(group) == 1:
        return t if device is None else t.to(device)
    is_src = rank(group) == src
    if shape is None or dtype is None:
        shape, dtype = broadcast_object((tuple(t.shape), t.dtype) if is_src else None, src, group)
    cdev = collective_device(group)
    buffer = t.detach().to(cdev).contiguous() if is_src else torch.empty(shape, dtype=dtype, device=cdev)
    dist.broadcast(buffer, src=global_rank(group, src), group=group)
    if is_src:
        return t if device is None else t.to(device)
    return buffer if device is None else buffer.to(device)


# ---------------------------------------------------------------- nested structures


def flatten_structure(obj: Any) -> tuple[Any, list[Tensor]]:
    """(spec, tensors): ``obj`` (nested tuples, lists, dicts; tensors and picklable leaves)
    split into a picklable spec and its tensors in order; :func:`unflatten_structure`
    inverts it."""
    tensors: list[Tensor] = []

    def walk(x):
        if isinstance(x, Tensor):
            tensors.append(x)
            return ("T", len(tensors) - 1)
        if isinstance(x, tuple):
            return ("t", [walk(y) for y in x])
        if isinstance(x, list):
            return ("l", [walk(y) for y in x])
        if isinstance(x, dict):
            return ("d", [(k, walk(v)) for k, v in x.items()])
        return ("o", x)

    return walk(obj), tensors


def unflatten_structure(spec: Any, tensors: Sequence[Tensor]) -> Any:
    kind, body = spec
    if kind == "T":
        return tensors[body]
    if kind == "t":
        return tuple(unflatten_structure(s, tensors) for s in body)
    if kind == "l":
        return [unflatten_structure(s, tensors) for s in body]
    if kind == "d":
        return {k: unflatten_structure(s, tensors) for k, s in body}
    return body


def structure_nbytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (what broadcasting it would send)."""
    return sum(t.numel() * t.element_size() for t in flatten_structure(obj)[1])


_WIRE = {torch.bool: torch.uint8}  # dtypes some backends do not broadcast


def _pack(tensors: Sequence[Tensor], device) -> dict:
    """dtype -> one flat buffer of every tensor of that dtype, in order."""
    by_dtype: dict = {}
    for t in tensors:
        wire = _WIRE.get(t.dtype, t.dtype)
        by_dtype.setdefault(wire, []).append(t.detach().reshape(-1).to(device=device, dtype=wire))
    return {dt: torch.cat(parts) for dt, parts in by_dtype.items()}


def _wire_layout(meta: list) -> dict:
    """dtype on the wire -> total numel, from a list of (shape, dtype)."""
    out: dict = {}
    for shape, dtype in meta:
        wire = _WIRE.get(dtype, dtype)
        n = 1
        for s in shape:
            n *= int(s)
        out[wire] = out.get(wire, 0) + n
    return out


def _unpack(buffers: dict, meta: list, device) -> list[Tensor]:
    offsets = {dt: 0 for dt in buffers}
    out = []
    for shape, dtype in meta:
        wire = _WIRE.get(dtype, dtype)
        n = 1
        for s in shape:
            n *= int(s)
        flat = buffers[wire][offsets[wire]:offsets[wire] + n]
        offsets[wire] += n
        out.append(flat.reshape(shape).to(device=device, dtype=dtype))
    return out


def broadcast_structures(objs: Optional[Sequence[Any]], src: int = 0, group=None,
                         device=None) -> Iterator[Any]:
    """Yield, on every rank, rank ``src``'s objects one by one (``objs`` is ignored on the
    other ranks and may be ``None``).

    Costs one ``broadcast_object`` of every object's structure, shapes and dtypes, then,
    per object, one broadcast per dtype of its tensors packed flat, so a receiver holds one
    object at a time. On ``src`` the objects themselves are yielded (no copy); elsewhere
    their tensors are on ``device`` (default: the collective device). Every rank must
    exhaust the iterator (the broadcasts happen as it advances): a rank that cannot use
    an object must still advance past it.
    """
    group = resolve_group(group)
    if world_size(group) == 1:
        yield from objs
        return
    is_src = rank(group) == src
    cdev = collective_device(group)
    device = cdev if device is None else torch.device(device)
    if is_src:
        flats = [flatten_structure(o) for o in objs]
        meta = [(spec, [(tuple(t.shape), t.dtype) for t in ts]) for spec, ts in flats]
    meta = broadcast_object(meta if is_src else None, src, group)
    total = 0
    for i, (spec, tmeta) in enumerate(meta):
        layout = _wire_layout(tmeta)
        if is_src:
            buffers = _pack(flats[i][1], cdev)
        else:
            buffers = {dt: torch.empty(n, dtype=dt, device=cdev) for dt, n in layout.items()}
        for dt in layout:  # same (insertion) order on every rank
            dist.broadcast(buffers[dt], src=global_rank(group, src), group=group)
            total += buffers[dt].nbytes
        if i == len(meta) - 1:
            logger.debug("broadcast_structures: rank %d broadcast %d objects, %d bytes", src,
                         len(meta), total)
        if is_src:
            yield objs[i]
        else:
            yield unflatten_structure(spec, _unpack(buffers, tmeta, device))
