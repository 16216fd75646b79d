"""Small collectives that let every rank learn the same facts, so that every rank takes the
same branch afterwards (raising the same error, or issuing the same next collective).

``group`` here is already resolved (see :func:`nngeo_dist.dist.group.resolve_group`) and
holds more than one process.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .group import collective_device, world_size


def digest(description: Any) -> int:
    """A deterministic signed 63-bit digest of ``repr(description)`` (same on every rank)."""
    raw = hashlib.sha256(repr(description).encode()).digest()[:8]
    return int.from_bytes(raw, "big", signed=True) >> 1


def all_gather_ints(values: Sequence[int], group) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank), exact int64, indexed by rank."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=collective_device(group))
    parts = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def all_gather_objects(obj: Any, group) -> list[Any]:
    """Every rank's picklable ``obj``, indexed by rank (for small objects, error paths)."""
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def ranks_by_value(values: Sequence[Any]) -> list[list[int]]:
    """Ranks grouped by equal (hashable) value, groups in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return list(groups.values())
