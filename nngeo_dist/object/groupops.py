"""Reductions and bookkeeping the objects use in a process group; a no-op for one process.

Every helper here is *collective*: every rank of the group calls it, in the same order.
Two of them fold fault handling into a collective the operation needs anyway, so that a
rank that raises during its local pass makes every rank raise (the failing rank its own
error, the others :class:`~nngeo_dist.dist.errors.RankFailedError` naming it) instead of
leaving them waiting in the next collective:

- :func:`sum_local_pass` — a pass over the local shard summed with ONE all_reduce, whose
  buffer also carries the example count, a failure flag and (optionally) scalars of rank 0
  that every rank must agree on (e.g. a CG residual that decides when to stop);
- :func:`agree_ints` — one all_gather of a few integers per rank (row counts, output
  sizes) plus a failure flag.

A second collective is issued only when some rank failed (to gather the messages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def group_sum(t: Tensor, group=None) -> Tensor:
    """Sum of ``t`` over the ranks of ``group`` (every rank gets it); ``group`` as an
    object holds it (:func:`held_group`: None is one process)."""
    from ..dist.reduce import all_reduce_tensor

    g = held_group(group)
    if g is None:
        return t
    if t.requires_grad and torch.is_grad_enabled():
        # a detached sum would give a loss built on it a gradient of zero from it, silently
        # (e.g. an EWC penalty on a row-sharded matrix): its backward says so instead
        return _SumOverRanks.apply(t, g)
    return all_reduce_tensor(t, g)


class _SumOverRanks(torch.autograd.Function):
    """The sum over a group's ranks, whose backward raises: autograd cannot follow an
    all_reduce (each rank would need the others' gradients)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        from ..dist.reduce import all_reduce_tensor

        return all_reduce_tensor(t, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(
            "a gradient was asked through a sum over the ranks of a process group, which "
            "autograd cannot follow: use a representation every rank holds whole "
            "(PMatDense, PMatDiag, PMatKFAC, ...) or obj.gather() for it"
        )


def resolved_group(group=None):
    """The group an operation runs over: ``group``, else the world group when one is
    initialised, else None (one process)."""
    from ..dist.group import resolve_group

    return resolve_group(group)


def effective_group(group=None):
    """:func:`resolved_group`, but ``None`` for a group of one process: objects store this,
    so that ``obj.group is None`` means "not sharded, no collective"."""
    from ..dist.group import resolve_group, world_size

    g = resolve_group(group)
    return None if g is None or world_size(g) == 1 else g


def held_group(group=None):
    """The group a data-holding object is sharded over, as its constructor sees it:
    ``None`` means *not sharded* (the data given is the whole), NOT the world group;
    builds pass the group they resolved explicitly. A group of one process is None too.

    Everything below a build (the objects, their operations and the helpers of this
    module) takes groups in this sense: a build resolves the user's ``group`` once
    (:func:`effective_group`), and resolving its None again would turn a group of one
    process into the world group."""
    return None if group is None else effective_group(group)


def group_rank(group) -> int:
    from ..dist.group import rank

    return 0 if group is None else rank(group)


def group_size(group) -> int:
    from ..dist.group import world_size

    return 1 if group is None else world_size(group)


def _raise_failures(error: Optional[BaseException], group) -> None:
    """Called by every rank once some rank is known to have failed."""
    from ..dist.errors import RankFailedError, gather_failures

    failures = gather_failures(error, group)
    if error is not None:
        raise error
    raise RankFailedError(sorted(failures), failures)


def sum_local_pass(
    fn: Callable[[], tuple[Tensor, int]],
    template: Callable[[], Tensor],
    group,
    carry: Sequence[float] = (),
) -> tuple[Tensor, float, list[float]]:
    """``fn()`` -> (total, count) over the local shard, summed over ``group`` by one
    all_reduce: returns (sum of totals, sum of counts, rank 0's ``carry`` values).

    ``template()`` gives zeros shaped like ``total`` for a rank whose ``fn`` raised: it
    still takes part in the all_reduce (flagging its failure), then every rank raises.
    ``carry``: scalars only rank 0 contributes, so every rank receives the same bits
    (used to take the same branch everywhere, e.g. CG's stopping test).
    """
    group = held_group(group)
    error = None
    if group is None:
        total, count = fn()
    else:
        try:
            total, count = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised after telling the others
            error = exc
            total, count = template(), 0
    carry = [float(c) for c in carry]
    lead = group_rank(group) == 0
    tail = [float(count), 0.0 if error is None else 1.0] + [c if lead else 0.0 for c in carry]
    flat = torch.cat([total.detach().reshape(-1), total.new_tensor(tail)])
    flat = group_sum(flat, group)
    k = len(carry)
    if group is not None and float(flat[-(k + 1)]) > 0:
        _raise_failures(error, group)
    head = flat[: total.numel()].reshape(total.shape)
    return head, float(flat[-(k + 2)]), [float(x) for x in flat[flat.numel() - k:]]


def agree_ints(values: Sequence[int], error: Optional[BaseException], group) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank), indexed by rank; raises on
    every rank when any rank passes a non-None ``error`` (its own error on that rank).
    One all_gather (a single process just raises ``error`` or returns ``[values]``)."""
    group = held_group(group)
    if group is None:
        if error is not None:
            raise error
        return [list(values)]
    from ..dist.agree import all_gather_ints

    rows = all_gather_ints(list(values) + [0 if error is None else 1], group)
    if any(r[-1] for r in rows):
        _raise_failures(error, group)
    return [r[:-1] for r in rows]


def check_model(model, group, check: bool = True) -> None:
    """With ``check`` and more than one rank: every rank's model must have the same
    parameters and buffers (RuntimeError on every rank naming the ranks otherwise)."""
    group = held_group(group)
    if check and group is not None:
        from ..dist.fingerprint import check_same_model

        check_same_model(model, group)


def refuse_store(cls_name: str, stored: str, store) -> None:
    """The in-memory objects do not write zarr stores: say which class does."""
    if store is not None:
        raise TypeError(
            f"{cls_name} holds its numbers in memory and takes no store=; to stream them to a "
            f"zarr store pass representation={stored}, store=path to the helper instead, or "
            f"save an in-memory result with .save(path)"
        )


@dataclass(frozen=True)
class RowLayout:
    """How the examples (rows) of a row-sharded object are split: rank r holds the
    global rows ``offsets[r] .. offsets[r] + counts[r]`` (rank order = global order)."""

    counts: tuple
    rank: int

    @property
    def n(self) -> int:
        return sum(self.counts)

    @property
    def n_local(self) -> int:
        return self.counts[self.rank]

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.rank])

    def local_slice(self) -> slice:
        return slice(self.offset, self.offset + self.n_local)

    @staticmethod
    def single(n: int) -> "RowLayout":
        return RowLayout((int(n),), 0)

    @staticmethod
    def of(n_local: int, group, layout: Optional["RowLayout"] = None) -> "RowLayout":
        """The layout of ``n_local`` rows here: ``layout`` when known, else learnt from the
        other ranks' row counts (collective) or, for one process, all rows."""
        if group is None:
            return RowLayout.single(n_local)
        if layout is None:
            layout = RowLayout(tuple(r[0] for r in agree_ints([n_local], None, group)), group_rank(group))
        if layout.n_local != n_local:
            raise ValueError(f"{n_local} rows here, the layout gives {layout.n_local}")
        return layout


def examples_hint(loader) -> int:
    """This rank's number of examples when the loader tells it without a pass (a
    DataLoader with a sized sampler and the default batching), else -1. Only used as a
    size hint for cost models, never for counting."""
    from torch.utils.data import BatchSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or (batch_sampler is not None and type(batch_sampler) is not BatchSampler):
        return -1
    try:
        return int(len(sampler))
    except TypeError:
        return -1
