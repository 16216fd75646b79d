"""Maps between parameter space and function space.

PushForward: PVector -> FVector, v -> (J_k(x_i) v)_{k,i}; PullBack: FVector -> PVector,
u -> sum_{k,i} u_{k,i} J_k(x_i).

In a process group of more than one rank these are row-sharded like the Gram matrix (see
:mod:`nngeo_dist.object.fspace`): rank r holds the Jacobian rows of its own examples,
``data`` (c, n_r, d), and a push-forward returns a :class:`ShardedFVector` (this rank's
columns (c, n_r)); a pull-back (J^T u, landing in parameter space) is summed over the group
and every rank gets the same PVector. ``to_torch()`` assembles the whole (c, n, d) on every
rank and ``gather(dst)`` gives a one-process object (both collective).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from ..generator.statistics import no_example_error
from .fspace import ShardedFVector, local_part, make_fvector
from .groupops import (
    RowLayout, agree_ints, check_model, effective_group, group_rank, group_sum, held_group,
    refuse_store,
)
from .pspace.base import picklable_state
from .vector import FVector, PVector


def _jacobian_rows_in_group(generator, loader, group) -> tuple[Tensor, RowLayout]:
    """(c, n_r, d) rows of this rank and the layout; a rank that raises makes every rank
    raise; an empty shard gets (c, 0, d) with the c of the other ranks."""
    error, rows, n_local, c = None, None, 0, -1
    try:
        rows, n_local = generator.jacobian_rows(loader)
        if n_local:
            c = rows.shape[0]
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree_ints
        error = exc
    got = agree_ints([n_local, c], error, group)
    layout = RowLayout(tuple(g[0] for g in got), group_rank(group))
    c = max(g[1] for g in got)
    if layout.n == 0:
        raise no_example_error()
    if n_local == 0:
        d = generator.layer_collection.numel()
        rows = torch.zeros((c, 0, d), dtype=generator.dtype, device=generator.device)
    return rows, layout


def check_space(layer_collection, v) -> None:
    """A PVector given to a map must live on the map's LayerCollection."""
    if not isinstance(v, PVector):
        raise TypeError(f"expected a PVector, got {type(v).__name__}")
    if v.layer_collection is not layer_collection and v.layer_collection != layer_collection:
        raise ValueError(
            "the PVector belongs to another LayerCollection than this map: build it with "
            "PVector.from_model(model, J.layer_collection) or on the same layers"
        )


def jacobian_rows(generator, loader, group) -> tuple[Tensor, RowLayout, object]:
    """This rank's Jacobian rows, their layout and the group (held: None is one process)."""
    group = held_group(group)
    if group is None:
        rows, n = generator.jacobian_rows(loader)
        if n == 0:
            raise no_example_error()
        return rows, RowLayout.single(n), None
    rows, layout = _jacobian_rows_in_group(generator, loader, group)
    return rows, layout, group


class _RowShardedJacobian:
    """Storage shared by the dense maps: J (c, n_r, d), row-sharded in a group."""

    def __init__(self, layer_collection, data: Tensor, generator=None, group=None,
                 layout: Optional[RowLayout] = None):
        if data.dim() != 3:
            raise ValueError(f"a Jacobian is (c, n, d); got shape {tuple(data.shape)}")
        self.layer_collection = layer_collection
        self.data = data
        self.generator = generator
        self.group = held_group(group)
        self.layout = RowLayout.of(data.shape[1], self.group, layout)

    @property
    def local(self) -> Tensor:
        """(c, n_r, d): this rank's rows (the whole for one process)."""
        return self.data

    def size(self, dim=None):
        c, _, d = self.data.shape
        s = torch.Size([c, self.layout.n, d])
        return s if dim is None else s[dim]

    def to_torch(self) -> Tensor:
        """The whole J (c, n, d) on every rank (collective in a group)."""
        if self.group is None:
            return self.data
        from ..dist.exchange import all_gather_rows

        return all_gather_rows(self.data, dim=1, group=self.group)

    def gather(self, dst: Optional[int] = None):
        """A one-process object of the same class holding the whole J: on every rank, or
        on rank ``dst`` only (``None`` elsewhere). Collective in a group."""
        if self.group is None:
            return self
        if dst is None:
            full = self.to_torch()
        else:
            from ..dist.exchange import gather_rows

            full = gather_rows(self.data, dim=1, dst=dst, group=self.group)
            if full is None:
                return None
        return type(self)(self.layer_collection, full, self.generator)

    def save(self, path, **kw) -> str:
        """Write to a zarr v3 store (see :func:`nngeo_dist.store.objects.save`); in a group
        every rank calls it and writes its own rows."""
        from ..store.objects import save

        return save(self, path, **kw)

    def __getstate__(self) -> dict:
        """Everything but the generator (not picklable; see
        :func:`~nngeo_dist.object.pspace.base.picklable_state`); refused in a group."""
        return picklable_state(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _like(self, cls, data: Tensor):
        return cls(self.layer_collection, data, self.generator, self.group, self.layout)

    def _check_same_layout(self, other) -> None:
        if other.layout.counts != self.layout.counts or other.data.shape != self.data.shape:
            raise ValueError(
                f"the two maps are sharded differently ({list(self.layout.counts)} vs "
                f"{list(other.layout.counts)} examples per rank): build both from the same shards"
            )

    def _pullback(self, u) -> PVector:
        c, _, d = self.data.shape
        # one transposed matrix-vector product over the (c n_r, d) rows (einsum adds
        # its own dispatch and layout checks to the same BLAS call)
        x = self.data.reshape(-1, d).t() @ local_part(u, self.layout, c).reshape(-1)
        return PVector(self.layer_collection, vector_repr=group_sum(x, self.group))


class PushForwardDense(_RowShardedJacobian):
    """Stores the Jacobian J (c, n, d) — this rank's rows (c, n_r, d) in a group."""

    @classmethod
    def build(cls, generator, loader, group=None, check_parameters: bool = True, store=None):
        refuse_store(cls.__name__, "PushForwardStored", store)
        group = effective_group(group)
        check_model(generator.model, group, check_parameters)
        rows, layout, group = jacobian_rows(generator, loader, group)
        return cls(generator.layer_collection, rows, generator, group, layout)

    def mv(self, v: PVector) -> FVector:
        """J v: (c, n) FVector, or this rank's columns as a ShardedFVector in a group."""
        check_space(self.layer_collection, v)
        return make_fvector(self.data @ v.to_torch(), self.group, self.layout)

    jvp = mv

    def transpose(self) -> "PullBackDense":
        return self._like(PullBackDense, self.data)

    def vjp(self, u: FVector) -> PVector:
        """J^T u summed over every example (reduced over the group)."""
        return self._pullback(u)

    def iter_by_module(self) -> Iterator[tuple[str, tuple]]:
        """(layer name, (weight,) or (weight, bias)) for each layer, in flat order: views of
        J, each (c, n, *its parameter's shape) — this rank's rows (c, n_r, ...) in a
        group — as nngeometry 0.4's ``PFMapDense.iter_by_module``."""
        yield from self.layer_collection.split_last_dim(self.data).items()

    def __rmul__(self, x) -> "PushForwardDense":
        return self._like(PushForwardDense, x * self.data)

    __mul__ = __rmul__

    def __add__(self, other: "PushForwardDense") -> "PushForwardDense":
        self._check_same_layout(other)
        return self._like(PushForwardDense, self.data + other.data)


class PullBackDense(_RowShardedJacobian):
    """J^T, stored as J (c, n, d) — this rank's rows (c, n_r, d) in a group."""

    @classmethod
    def build(cls, generator, loader, group=None, check_parameters: bool = True, store=None):
        refuse_store(cls.__name__, "PullBackStored", store)
        return PushForwardDense.build(generator, loader, group, check_parameters).transpose()

    def mv(self, u: FVector) -> PVector:
        """J^T u (``u``: a ShardedFVector of the same layout, or the whole (c, n)); in a
        group the sum over every rank's examples, the same PVector on every rank."""
        return self._pullback(u)

    def transpose(self) -> PushForwardDense:
        return self._like(PushForwardDense, self.data)


class PushForwardImplicit:
    """J v for every example of the loader by one forward-mode pass per batch; memory c n.

    In a group each rank maps its own shard; ``mv`` returns a ShardedFVector (its columns)
    after one small all_gather of the row counts (which also makes a rank's failure
    visible on every rank)."""

    def __init__(self, layer_collection, generator, loader, group=None):
        self.layer_collection = layer_collection
        self.generator = generator
        self.loader = loader
        self.group = held_group(group)

    @classmethod
    def build(cls, generator, loader, group=None, check_parameters: bool = True):
        group = effective_group(group)
        check_model(generator.model, group, check_parameters)
        return cls(generator.layer_collection, generator, loader, group)

    def _local(self, v: PVector) -> Tensor:
        d = v.get_dict_representation()
        tangents = [t for name in self.layer_collection.layers for t in d[name]]
        cols = [jv.t() for _, _, jv in self.generator.jvp_batches(self.loader, tangents)]
        return torch.cat(cols, dim=1) if cols else None

    def mv(self, v: PVector) -> FVector:
        check_space(self.layer_collection, v)
        if self.group is None:
            x = self._local(v)
            if x is None:
                raise no_example_error()
            return FVector(x)
        error, x = None, None
        try:
            x = self._local(v)
        except Exception as exc:  # noqa: BLE001 - raised on every rank by agree_ints
            error = exc
        n_local = 0 if x is None else x.shape[1]
        c = -1 if x is None else x.shape[0]
        got = agree_ints([n_local, c], error, self.group)
        layout = RowLayout(tuple(g[0] for g in got), group_rank(self.group))
        if layout.n == 0:
            raise no_example_error()
        if x is None:
            x = v.to_torch().new_zeros((max(g[1] for g in got), 0))
        return ShardedFVector(x, self.group, layout)

    jvp = mv

    def __getstate__(self) -> dict:
        # refused with a sentence (it holds a loader, no numbers) rather than pickle's
        # "Can't pickle local object" about the generator's function
        return picklable_state(self)


#: nngeometry 0.4's names for the push-forward maps (``nngeometry.object.map``), so that
#: ``from nngeometry.object import PFMapDense`` ports by changing the package name
PFMapDense = PushForwardDense
PFMapImplicit = PushForwardImplicit
