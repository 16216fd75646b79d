"""PMatDiag: the diagonal of M."""
from __future__ import annotations

import torch

from .base import PMatAbstract


class PMatDiag(PMatAbstract):
    """Stores diag(M) (d,). Memory d; exact for a diagonal matrix."""

    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return generator.diag_spec(list(layer_collection.layers))

    def __init__(self, layer_collection, data, generator=None):
        super().__init__(layer_collection, generator)
        self.data = data

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None):
        return cls(layer_collection, stats.mean("diag"), generator)

    def mv(self, v):
        self._check_vector(v)
        return self._vector(self.data * v.to_torch())

    def vTMv(self, v):
        self._check_vector(v)
        x = v.to_torch()
        return torch.dot(x * self.data, x)

    def trace(self):
        return self.data.sum()

    def frobenius_norm(self):
        return torch.linalg.vector_norm(self.data)

    def get_diag(self):
        return self.data

    def to_torch(self):
        return torch.diag(self.data)

    def solve(self, v, regul: float = 1e-8):
        self._check_vector(v)
        self._check_regul(regul, singular_ok=bool((self.data > 0).all()))
        return self._vector(v.to_torch() / (self.data + regul))

    def inverse(self, regul: float = 1e-8):
        self._check_regul(regul, singular_ok=bool((self.data > 0).all()))
        return PMatDiag(self.layer_collection, 1.0 / (self.data + regul), self.generator)

    def __add__(self, other):
        self._same_kind(other)
        return PMatDiag(self.layer_collection, self.data + other.data, self.generator)

    def __sub__(self, other):
        self._same_kind(other)
        return PMatDiag(self.layer_collection, self.data - other.data, self.generator)

    def __rmul__(self, x):
        return PMatDiag(self.layer_collection, x * self.data, self.generator)

    __mul__ = __rmul__
