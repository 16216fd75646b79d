"""Exact sharding of a dataset across the ranks of a process group.

Every index in ``range(n)`` goes to exactly one rank; nothing is padded, dropped or
duplicated, whatever ``n`` and the world size (torch's ``DistributedSampler`` pads by
default and is not used). Shards are contiguous blocks whose sizes differ by at most one;
the first ``n % world`` ranks get one more index. A rank gets an empty shard when
``n < world``: it still takes part in every reduction, with zero sums and count 0.

:func:`shard_loader` is collective in a group of several ranks: the ranks agree on the
dataset length first, since shards cut from different lengths would overlap or miss examples.
"""
from __future__ import annotations

import operator
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .group import rank as group_rank
from .group import resolve_group
from .group import world_size as group_world_size


def _check_rank(rank: int, world: int) -> None:
    if world < 1:
        raise ValueError(f"the world size must be at least 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1} (world size {world})")


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world`` ranks owns.

    The blocks of ranks ``0 .. world-1`` are consecutive and cover ``range(n)`` exactly once;
    their sizes are ``n // world`` or ``n // world + 1`` (larger ones first); may be empty.
    """
    if n < 0:
        raise ValueError(f"the number of examples must be >= 0, got {n}")
    _check_rank(rank, world)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_indices(n: int, rank: int, world: int, seed: Optional[int] = None) -> list[int]:
    """The indices ``rank`` owns: its :func:`shard_range`, of ``range(n)`` or, when
    ``seed`` is given, of one permutation of ``range(n)`` drawn with that seed (the same
    on every rank, so the shards still partition ``range(n)``)."""
    block = shard_range(n, rank, world)
    if seed is None:
        return list(block)
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n, generator=generator)
    return permutation[block.start:block.stop].tolist()


class ShardSampler(Sampler[int]):
    """A sampler over this rank's exact shard of ``range(n)`` (see :func:`shard_indices`).

    Deterministic; no padding; in order unless ``seed`` is given. ``set_epoch(e)`` changes
    the permutation to the one of seed ``seed + e`` (no effect without a seed).
    """

    def __init__(self, n: int, rank: int, world: int, seed: Optional[int] = None):
        shard_range(n, rank, world)  # validates the arguments
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        seed = None if self.seed is None else self.seed + self.epoch
        return shard_indices(self.n, self.rank, self.world, seed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(shard_range(self.n, self.rank, self.world))


# DataLoader settings carried over from a loader passed to shard_loader. Not carried:
# sampler / batch_sampler / shuffle (replaced by the shard) and drop_last (would lose
# examples: sharding is exact).
_CARRIED_LOADER_SETTINGS = (
    "collate_fn", "num_workers", "pin_memory", "timeout", "worker_init_fn",
    "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device",
)
_FORBIDDEN_LOADER_KWARGS = ("sampler", "batch_sampler", "shuffle")


def _settings_of(loader: DataLoader) -> dict[str, Any]:
    settings = {k: getattr(loader, k) for k in _CARRIED_LOADER_SETTINGS if hasattr(loader, k)}
    if settings.get("pin_memory_device") == "":
        settings.pop("pin_memory_device")
    if getattr(loader, "num_workers", 0) > 0 and getattr(loader, "prefetch_factor", None):
        settings["prefetch_factor"] = loader.prefetch_factor
    return settings


def _check_loader_kwargs(loader_kwargs: dict[str, Any]) -> None:
    given = [k for k in _FORBIDDEN_LOADER_KWARGS if k in loader_kwargs]
    if given:
        raise ValueError(
            f"shard_loader chooses the examples of each rank itself; do not pass {given} "
            "(use seed=... for a shuffled, still exact, sharding)"
        )
    if loader_kwargs.get("drop_last"):
        raise ValueError(
            "drop_last=True would leave examples out; sharding is exact, every example is "
            "counted once: drop it"
        )


def _map_style_length(dataset: Any) -> int:
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            "shard_loader needs a map-style dataset (with __len__ and __getitem__) to shard "
            "it exactly; an IterableDataset must shard itself (e.g. by rank inside __iter__)"
        )
    try:
        return len(dataset)
    except TypeError:
        raise TypeError(
            f"shard_loader needs a dataset with __len__; {type(dataset).__name__} has none"
        ) from None


def _check_batch_size(batch_size: Any) -> None:
    # 0 used to mean "the default" (batch_size or 1): a typo ran 100x slower, silently
    if batch_size is None:
        return
    try:
        ok = not isinstance(batch_size, bool) and operator.index(batch_size) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"batch_size={batch_size!r}: pass a positive whole number of examples per batch "
            "(or None for the loader's own, else 1)"
        )


def _local_length(dataset_or_loader: Any, batch_size: Optional[int],
                  loader_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any], Optional[int], int]:
    """Everything :func:`shard_loader` checks on this rank alone: (dataset, carried loader
    settings, batch size, length). Raises on bad arguments."""
    _check_loader_kwargs(loader_kwargs)
    _check_batch_size(batch_size)
    settings: dict[str, Any] = {}
    dataset = dataset_or_loader
    if isinstance(dataset_or_loader, DataLoader):
        dataset = dataset_or_loader.dataset
        settings = _settings_of(dataset_or_loader)
        if batch_size is None:
            batch_size = dataset_or_loader.batch_size
            if batch_size is None:
                raise ValueError(
                    "the loader has no batch_size (it uses a batch_sampler); pass "
                    "batch_size=... to shard_loader"
                )
    return dataset, settings, batch_size, _map_style_length(dataset)


def _agreed_length(n: int, error: Optional[BaseException], group) -> int:
    """The dataset length every rank of ``group`` has, learnt in one all_gather (which also
    carries whether a rank failed its local checks: then every rank raises, see
    :func:`~nngeo_dist.object.groupops.agree_ints`). Shards computed from different
    lengths would overlap or leave examples out, so differing lengths raise, on every rank,
    an error naming each rank's length."""
    # groupops is imported here, not at the top: nngeo_dist.object builds on nngeo_dist.dist
    from ..object.groupops import agree_ints
    from .errors import on_every_rank
    from .fingerprint import _listing

    lengths = [row[0] for row in agree_ints([n], error, group)]
    if len(set(lengths)) == 1:
        return lengths[0]
    listing = _listing([f"{length} examples" for length in lengths])
    raise on_every_rank(ValueError(
        f"the dataset has a different length on each rank ({listing}): every rank must see "
        "the same dataset to shard it exactly; check that each node reads the same, "
        "up-to-date copy of the data"
    ))


def shard_loader(
    dataset_or_loader: "Dataset | DataLoader",
    group=None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader over this rank's exact shard of a map-style dataset.

    ``dataset_or_loader``: a map-style dataset, or a DataLoader whose ``dataset``,
    ``batch_size``, ``collate_fn``, ``num_workers`` (and other worker settings) are reused;
    its sampler, shuffling and ``drop_last`` are not. ``batch_size`` (a positive int;
    default: the loader's, else 1) and ``loader_kwargs`` override. ``group`` as in
    :func:`resolve_group`: for a single process the shard is the whole dataset.
    ``seed``: see :class:`ShardSampler`.

    Collective when the group has more than one rank: every rank must call it (one
    all_gather of the dataset length). Bad arguments on any rank, or lengths that differ
    between ranks, raise on every rank (the latter a ValueError naming each rank's length).
    """
    error: Optional[BaseException] = None
    dataset, settings, n = dataset_or_loader, {}, 0
    try:
        dataset, settings, batch_size, n = _local_length(dataset_or_loader, batch_size, loader_kwargs)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by _agreed_length
        error = exc
    group = resolve_group(group)
    n = _agreed_length(n, error, group)
    sampler = ShardSampler(n, group_rank(group), group_world_size(group), seed=seed)
    settings.update(loader_kwargs)
    settings.pop("drop_last", None)
    return DataLoader(dataset, batch_size=1 if batch_size is None else batch_size,
                      sampler=sampler, **settings)
