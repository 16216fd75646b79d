"""Failures on one rank made visible on every rank, instead of a hang.

When one rank raises while computing its local part, the other ranks would wait forever
(or until the process-group timeout) at the next collective. :func:`collective_errors`
and :func:`run_collectively` put one extra collective after the local computation: every
rank says whether it failed; if any did, the failing ranks re-raise their own exception and
every other rank raises :class:`RankFailedError` naming the failing ranks and their errors.

Scope: this covers exceptions raised by the *local computation* inside the block. A rank
that dies (killed, segfault) or a collective that never completes inside the block is only
bounded by the process-group timeout (see :func:`nngeo_dist.dist.group.resolve_timeout`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, TypeVar

import torch.distributed as dist

from .agree import all_gather_ints, all_gather_objects
from .group import resolve_group, world_size

T = TypeVar("T")


def on_every_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised by every rank of the group at the same point (after a
    collective that told them all), so a caller may still synchronise before exiting."""
    exc.raised_on_every_rank = True
    return exc


def raised_on_every_rank(exc: BaseException) -> bool:
    return getattr(exc, "raised_on_every_rank", False)


class RankFailedError(RuntimeError):
    """Raised on the ranks that did not fail when one or more other ranks failed.

    ``failed_ranks``: ranks (within the group) that raised; ``messages``: rank -> a one-line
    description of that rank's exception.
    """

    def __init__(self, failed_ranks: list[int], messages: dict[int, str]):
        self.failed_ranks = list(failed_ranks)
        self.messages = dict(messages)
        which = ", ".join(str(r) for r in self.failed_ranks)
        detail = "; ".join(f"rank {r}: {self.messages.get(r, '?')}" for r in self.failed_ranks)
        plural = "s" if len(self.failed_ranks) > 1 else ""
        super().__init__(
            f"rank{plural} {which} of the process group failed, so this rank stops too "
            f"({detail}); see the failing rank's traceback for the cause"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = text[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def gather_failures(error: Optional[BaseException], group) -> dict[int, str]:
    """Every rank learns which ranks failed: rank -> description (empty when none did).

    One all_gather of a flag; on failure a second all_gather of the descriptions (taken by
    every rank, since every rank sees the same flags).
    """
    flags = all_gather_ints([0 if error is None else 1], group)
    failed = [r for r, (flag,) in enumerate(flags) if flag]
    if not failed:
        return {}
    descriptions = all_gather_objects(None if error is None else _describe(error), group)
    return {r: descriptions[r] or "?" for r in failed}


@contextlib.contextmanager
def collective_errors(group=None) -> Iterator[None]:
    """Context manager: a failure inside the block on any rank raises on every rank.

    The failing rank re-raises its own exception (with a note naming the other failing
    ranks, if any); the others raise :class:`RankFailedError`. Every rank must enter and
    leave the block (it ends with one collective). A no-op for a single process.
    """
    group = resolve_group(group)
    if world_size(group) == 1:
        yield
        return
    error: Optional[Exception] = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised below after telling the others
        error = exc
    failures = gather_failures(error, group)
    if error is not None:
        others = sorted(r for r in failures if r != dist.get_rank(group))
        if others:
            error.add_note(f"ranks {others} of the process group failed as well")
        raise on_every_rank(error)
    if failures:
        raise on_every_rank(RankFailedError(sorted(failures), failures))


def run_collectively(fn: Callable[..., T], group=None, *args, **kwargs) -> T:
    """Call ``fn(*args, **kwargs)`` under :func:`collective_errors` and return its result."""
    with collective_errors(group):
        return fn(*args, **kwargs)
