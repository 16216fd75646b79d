"""Maps between parameter space and function space.

PushForward: PVector -> FVector, v -> (J_k(x_i) v)_{k,i}; PullBack: FVector -> PVector,
u -> sum_{k,i} u_{k,i} J_k(x_i).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .vector import FVector, PVector


class PushForwardDense:
    """Stores the Jacobian J (c, n, d)."""

    def __init__(self, layer_collection, data: Tensor, generator=None):
        self.layer_collection = layer_collection
        self.data = data
        self.generator = generator

    @classmethod
    def build(cls, generator, loader, group=None):
        rows, _ = generator.jacobian_rows(loader)
        return cls(generator.layer_collection, rows, generator)

    def to_torch(self) -> Tensor:
        return self.data

    def size(self, dim=None):
        return self.data.size() if dim is None else self.data.size(dim)

    def mv(self, v: PVector) -> FVector:
        return FVector(self.data @ v.to_torch())

    jvp = mv

    def transpose(self) -> "PullBackDense":
        return PullBackDense(self.layer_collection, self.data, self.generator)

    def vjp(self, u: FVector) -> PVector:
        return self.transpose().mv(u)

    def __rmul__(self, x) -> "PushForwardDense":
        return PushForwardDense(self.layer_collection, x * self.data, self.generator)

    def __add__(self, other: "PushForwardDense") -> "PushForwardDense":
        return PushForwardDense(self.layer_collection, self.data + other.data, self.generator)


class PullBackDense:
    """J^T, stored as J (c, n, d)."""

    def __init__(self, layer_collection, data: Tensor, generator=None):
        self.layer_collection = layer_collection
        self.data = data
        self.generator = generator

    @classmethod
    def build(cls, generator, loader, group=None):
        return PushForwardDense.build(generator, loader, group).transpose()

    def to_torch(self) -> Tensor:
        return self.data

    def mv(self, u: FVector) -> PVector:
        x = torch.einsum("knd,kn->d", self.data, u.to_torch())
        return PVector(self.layer_collection, vector_repr=x)


class PushForwardImplicit:
    """J v for every example of the loader by one forward-mode pass per batch; memory c n."""

    def __init__(self, layer_collection, generator, loader):
        self.layer_collection = layer_collection
        self.generator = generator
        self.loader = loader

    @classmethod
    def build(cls, generator, loader, group=None):
        return cls(generator.layer_collection, generator, loader)

    def mv(self, v: PVector) -> FVector:
        d = v.get_dict_representation()
        tangents = [t for name in self.layer_collection.layers for t in d[name]]
        cols = [jv.t() for _, _, jv in self.generator.jvp_batches(self.loader, tangents)]
        if not cols:
            raise ValueError("the loader is empty")
        return FVector(torch.cat(cols, dim=1))

    jvp = mv
