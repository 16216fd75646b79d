"""Reductions the objects use; a no-op for one process (``group`` resolving to None)."""
from __future__ import annotations

from torch import Tensor


def group_sum(t: Tensor, group=None) -> Tensor:
    """Sum of ``t`` over the ranks of ``group`` (every rank gets it)."""
    from ..dist.group import resolve_group
    from ..dist.reduce import all_reduce_tensor

    g = resolve_group(group)
    if g is None:
        return t
    return all_reduce_tensor(t, g)


def resolved_group(group=None):
    """The group an operation runs over: ``group``, else the world group when one is
    initialised, else None (one process)."""
    from ..dist.group import resolve_group

    return resolve_group(group)
