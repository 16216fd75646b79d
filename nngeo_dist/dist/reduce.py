"""Reductions over a process group: statistics, tensors, objects, row-sharded gathers.

Conventions:

- ``group`` is resolved with :func:`nngeo_dist.dist.group.resolve_group`; a single process
  (``None`` after resolution, or a group of one) issues no collective and returns its
  input unchanged.
- Every rank must call the same function with arguments of the same structure (names,
  shapes, dtypes). :func:`all_reduce_statistics` and :func:`all_gather_tensors_varlen`
  check it with one small collective first, and a mismatch raises the same ``ValueError``
  on every rank instead of hanging or summing garbage; :func:`all_reduce_tensor` (called
  at every product of an implicit operator) does not.
- Collectives run on :func:`nngeo_dist.dist.group.collective_device`; results are returned
  on the devices the inputs were on. Inputs are never modified.
- Byte counts (:func:`bytes_reduced`, :func:`bytes_naive`) are the payload this rank hands
  to all_reduce, per process, cumulated since :func:`reset_bytes_reduced`; "naive" is what
  sending every sum in full would have cost.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .agree import all_gather_ints, all_gather_objects, digest
from .group import (
    collective_device, device_for_rank, global_rank, rank, resolve_group, world_size,
)

logger = logging.getLogger("nngeo_dist.dist")

DEFAULT_BUCKET_BYTES = 64 * 2**20

_BYTES = {"sent": 0, "naive": 0}


# ---------------------------------------------------------------- byte counters


def bytes_reduced() -> int:
    """Bytes this process handed to all_reduce since the last reset (payload only)."""
    return _BYTES["sent"]


def bytes_naive() -> int:
    """Bytes the same reductions would have sent with every sum in full (no packing)."""
    return _BYTES["naive"]


def reset_bytes_reduced() -> None:
    """Set both byte counters back to zero."""
    _BYTES["sent"] = 0
    _BYTES["naive"] = 0


def _count_bytes(sent: int, naive: int) -> None:
    _BYTES["sent"] += sent
    _BYTES["naive"] += naive


# ---------------------------------------------------------------- agreement checks


# ---------------------------------------------------------------- statistics layout


@dataclass(frozen=True)
class _Entry:
    """One sum as it travels: its shape and dtype, and whether it goes packed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    packed: bool

    @property
    def sent_numel(self) -> int:
        if not self.packed:
            return _numel(self.shape)
        m = self.shape[-1]
        return _numel(self.shape[:-2]) * (m * (m + 1) // 2)

    def describe(self) -> str:
        kind = ", symmetric" if self.packed else ""
        return f"{tuple(self.shape)} {str(self.dtype).replace('torch.', '')}{kind}"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _entries(stats) -> list[_Entry]:
    """The sums of ``stats`` in name order (the order every rank uses)."""
    return [
        _Entry(name, tuple(stats.sums[name].shape), stats.sums[name].dtype,
               name in stats.symmetric)
        for name in sorted(stats.sums)
    ]


def _layout_description(entries: list[_Entry], bucket_bytes: int) -> tuple:
    return (bucket_bytes, tuple((e.name, e.shape, str(e.dtype), e.packed) for e in entries))


def _mismatch_message(descriptions: list[dict[str, str]]) -> str:
    """A sentence naming which ranks disagree on which sums."""
    reference = descriptions[0]
    lines = []
    for r, desc in enumerate(descriptions[1:], start=1):
        for name in sorted(set(reference) | set(desc)):
            a, b = reference.get(name, "missing"), desc.get(name, "missing")
            if a != b:
                lines.append(f"{name!r} is {a} on rank 0 but {b} on rank {r}")
    if not lines:
        lines.append("the ranks passed different bucket sizes")
    return (
        "cannot reduce statistics: the ranks do not hold sums of the same names, shapes and "
        "dtypes: " + "; ".join(lines) + ". Every rank must compute the same statistics (a "
        "rank with an empty shard must still produce zero sums of the right shapes)"
    )


def _check_symmetric_shapes(entries: list[_Entry]) -> None:
    for e in entries:
        if e.packed and (len(e.shape) < 2 or e.shape[-1] != e.shape[-2]):
            raise ValueError(
                f"statistic {e.name!r} is declared symmetric but has shape {e.shape}; "
                "symmetric sums must have shape (..., m, m)"
            )


def _agree_and_count(stats, entries: list[_Entry], bucket_bytes: int, group) -> int:
    """Check every rank has the same layout (raise ValueError on all if not); total count."""
    description = _layout_description(entries, bucket_bytes)
    gathered = all_gather_ints([int(stats.count), digest(description)], group)
    if len({g[1] for g in gathered}) > 1:
        descriptions = all_gather_objects({e.name: e.describe() for e in entries}, group)
        raise ValueError(_mismatch_message(descriptions))
    _check_symmetric_shapes(entries)
    return sum(g[0] for g in gathered)


# ---------------------------------------------------------------- packing


def _triu_mask(m: int, device: torch.device) -> Tensor:
    """Boolean (m, m) mask of the upper triangle (row-major order = torch.triu_indices')."""
    return torch.ones(m, m, dtype=torch.bool, device=device).triu()


def pack_symmetric(t: Tensor) -> Tensor:
    """The upper triangles of ``t`` (..., m, m) as (..., m(m+1)/2), row-major order."""
    return t[..., _triu_mask(t.shape[-1], t.device)]


def unpack_symmetric(packed: Tensor, m: int) -> Tensor:
    """The symmetric (..., m, m) matrices whose upper triangles are ``packed``."""
    out = packed.new_zeros(*packed.shape[:-1], m, m)
    out[..., _triu_mask(m, packed.device)] = packed
    out += out.transpose(-2, -1).tril(-1)
    return out


def _payload(t: Tensor, entry: _Entry) -> Tensor:
    """The flat values of one sum as they travel."""
    t = t.detach()
    return (pack_symmetric(t) if entry.packed else t).reshape(-1)


def _restore(flat: Tensor, entry: _Entry) -> Tensor:
    if entry.packed:
        m = entry.shape[-1]
        return unpack_symmetric(flat.view(*entry.shape[:-2], m * (m + 1) // 2), m)
    return flat.view(entry.shape)


def _dtype_groups(entries: list[_Entry]) -> dict[torch.dtype, list[_Entry]]:
    """Entries grouped by dtype, dtypes in order of first appearance."""
    groups: dict[torch.dtype, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.dtype, []).append(e)
    return groups


def _bucket_slices(total_numel: int, element_size: int, bucket_bytes: int) -> list[slice]:
    """Consecutive slices of a flat buffer, each at most ``bucket_bytes`` bytes."""
    step = max(1, bucket_bytes // element_size)
    return [slice(a, min(a + step, total_numel)) for a in range(0, total_numel, step)]


def _reduce_flat_buffer(buffer: Tensor, bucket_bytes: int, group) -> int:
    """all_reduce SUM ``buffer`` in place, bucket by bucket; the number of buckets."""
    slices = _bucket_slices(buffer.numel(), buffer.element_size(), bucket_bytes)
    for s in slices:
        dist.all_reduce(buffer[s], op=dist.ReduceOp.SUM, group=group)
    return len(slices)


def _reduce_dtype_group(stats, entries: list[_Entry], bucket_bytes: int, group) -> dict:
    """Reduce the sums of one dtype through one flat buffer; name -> reduced tensor."""
    device = collective_device(group)
    buffer = torch.cat([_payload(stats.sums[e.name], e).to(device) for e in entries])
    _reduce_flat_buffer(buffer, bucket_bytes, group)
    out, offset = {}, 0
    for e in entries:
        flat = buffer[offset:offset + e.sent_numel]
        offset += e.sent_numel
        if flat.numel() != buffer.numel() and not e.packed:
            flat = flat.clone()  # do not let one sum's storage hold the whole buffer
        out[e.name] = _restore(flat, e).to(stats.sums[e.name].device)
    return out


def all_reduce_statistics(stats, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
    """The sum of ``stats`` over the ranks of ``group``: a new ``Statistics``.

    Sums of one dtype travel in contiguous buckets of at most ``bucket_bytes``; sums named
    in ``stats.symmetric`` (shape (..., m, m)) travel as packed upper triangles and come
    back as exactly symmetric matrices built from the summed upper triangles. The count is
    summed exactly (int64). Every rank must call this, including ranks with an empty shard
    (zero sums of the same shapes, count 0); differing names/shapes/dtypes raise
    ``ValueError`` on every rank. A single process gets ``stats`` back unchanged.
    """
    group = resolve_group(group)
    if world_size(group) == 1:
        return stats
    entries = _entries(stats)
    count = _agree_and_count(stats, entries, bucket_bytes, group)
    sums: dict[str, Tensor] = {}
    for dtype_entries in _dtype_groups(entries).values():
        sums.update(_reduce_dtype_group(stats, dtype_entries, bucket_bytes, group))
    _log_statistics_bytes(entries)
    return type(stats)({name: sums[name] for name in stats.sums}, count, stats.symmetric)


def _log_statistics_bytes(entries: list[_Entry]) -> None:
    sent = sum(e.sent_numel * _element_size(e.dtype) for e in entries)
    naive = sum(_numel(e.shape) * _element_size(e.dtype) for e in entries)
    _count_bytes(sent, naive)
    logger.debug(
        "all_reduce_statistics: %d sums sent %d bytes (a full send: %d bytes, ratio %.3f)",
        len(entries), sent, naive, sent / naive if naive else 1.0,
    )


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- tensors and objects


def all_reduce_tensor(t: Tensor, group=None) -> Tensor:
    """The sum of ``t`` over the ranks of ``group`` (``t`` itself for a single process).

    ``t`` is left untouched (the sum is a new tensor on ``t``'s device, not differentiable),
    so it is safe to pass views, leaves that require grad, or tensors used elsewhere.
    Every rank must pass a tensor of the same shape and dtype (not checked: one collective).
    """
    group = resolve_group(group)
    if world_size(group) == 1:
        return t
    buffer = t.detach().to(collective_device(group), copy=True).contiguous()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    _count_bytes(buffer.nbytes, buffer.nbytes)
    logger.debug("all_reduce_tensor: sent %d bytes", buffer.nbytes)
    return buffer.to(t.device)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` (a rank within ``group``), returned on every rank (pickled)."""
    group = resolve_group(group)
    if world_size(group) == 1:
        return obj
    box = [obj if rank(group) == src else None]
    dist.broadcast_object_list(box, src=global_rank(group, src), group=group)
    return box[0]


def broadcast_tensor(t: Optional[Tensor], src: int = 0, group=None) -> Tensor:
    """Rank ``src``'s tensor ``t`` on every rank (other ranks may pass ``None``).

    For results computed on one rank (e.g. an eigendecomposition) and shared: the shape,
    dtype and device type travel as a small object, the values through one broadcast.
    Returned on ``t``'s device on ``src``; elsewhere on a device of the same type: the cpu
    for a cpu tensor (whatever the backend: a cpu model under NCCL stays on the cpu), this
    rank's :func:`nngeo_dist.dist.group.device_for_rank` for a cuda one.
    """
    from .exchange import broadcast_from

    group = resolve_group(group)
    if world_size(group) == 1:
        return t
    is_src = rank(group) == src
    shape, dtype, kind = broadcast_object(
        (tuple(t.shape), t.dtype, t.device.type) if is_src else None, src, group)
    device = None if is_src else (device_for_rank() if kind == "cuda" else torch.device(kind))
    return broadcast_from(t, src, group, shape=shape, dtype=dtype, device=device)


def all_gather_tensors_varlen(t: Tensor, group=None) -> Tensor:
    """The concatenation, in rank order, of every rank's rows ``t`` (n_r, ...).

    Ranks may hold different numbers of rows, zero included; the trailing shape and dtype
    must agree (a mismatch raises ``ValueError`` on every rank). The result is on ``t``'s
    device. A single process gets ``t`` back.
    """
    group = resolve_group(group)
    if world_size(group) == 1:
        return t
    trailing = tuple(t.shape[1:]) if t.dim() >= 1 else None
    rows = int(t.shape[0]) if t.dim() >= 1 else 0
    gathered = all_gather_ints([rows, digest((trailing, str(t.dtype)))], group)
    if len({g[1] for g in gathered}) > 1 or trailing is None:
        _raise_varlen_mismatch(trailing, t.dtype, group)
    counts = [g[0] for g in gathered]
    if max(counts) == 0:
        return t.detach().clone()
    parts = _gather_padded(t, max(counts), group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)


def _gather_padded(t: Tensor, max_rows: int, group) -> list[Tensor]:
    """Every rank's ``t`` padded with zero rows to ``max_rows``, on the collective device."""
    device = collective_device(group)
    padded = t.new_zeros((max_rows, *t.shape[1:]), device=device)
    padded[: t.shape[0]] = t.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return parts


def _raise_varlen_mismatch(trailing: Optional[tuple], dtype: torch.dtype, group) -> None:
    shapes = all_gather_objects(
        "a 0-d tensor" if trailing is None else f"rows of shape {trailing} {dtype}", group
    )
    listing = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
    raise ValueError(
        "cannot gather row-sharded tensors: every rank must pass a tensor (n_r, ...) with "
        f"the same trailing shape and dtype; got {listing}"
    )
