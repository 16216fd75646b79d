"""PMatBlockDiag: one dense block per layer, zero across layers."""
from __future__ import annotations

from collections import OrderedDict

import torch

from .base import PMatAbstract, regularised_inverse, regularised_solve
from ..sums import sum_of_squares


class PMatBlockDiag(PMatAbstract):
    """Stores, per layer l, M_ll (d_l, d_l). Memory sum_l d_l^2; exact within layers."""

    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return generator.block_spec(list(layer_collection.layers))

    def __init__(self, layer_collection, data: dict, generator=None):
        super().__init__(layer_collection, generator)
        self.data = data
        self.evals = self.evecs = None

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None):
        return cls(layer_collection, OrderedDict((n, stats.mean(f"block/{n}")) for n in layer_collection.layers), generator)

    def _per_layer(self, v, fn):
        self._check_vector(v)
        return v.from_layer_flats(self.layer_collection, {n: fn(b, v.layer_flat(n)) for n, b in self.data.items()})

    def mv(self, v):
        return self._per_layer(v, lambda b, x: b @ x)

    def vTMv(self, v):
        self._check_vector(v)
        return sum(torch.dot(v.layer_flat(n), b @ v.layer_flat(n)) for n, b in self.data.items())

    def trace(self):
        return sum(torch.trace(b) for b in self.data.values())

    def frobenius_norm(self):
        return torch.sqrt(sum(sum_of_squares(b) for b in self.data.values()))

    def get_diag(self):
        return torch.cat([torch.diagonal(b) for b in self.data.values()])

    def to_torch(self):
        return torch.block_diag(*self.data.values())

    def solve(self, v, regul: float = 1e-8):
        self._check_regul(regul)
        return self._per_layer(v, lambda b, x: regularised_solve(b, x, regul))

    def inverse(self, regul: float = 1e-8):
        self._check_regul(regul)
        return self._map(lambda b: regularised_inverse(b, regul))

    def mm(self, other: "PMatBlockDiag") -> "PMatBlockDiag":
        """The matrix product M @ other: block by block, M_ll @ other_ll."""
        self._same_kind(other)
        blocks = OrderedDict((n, b @ other.data[n]) for n, b in self.data.items())
        return PMatBlockDiag(self.layer_collection, blocks, self.generator)

    def compute_eigendecomposition(self):
        """Exact and as PMatDense's: eigenvalues ascending (d,) and eigenvectors as columns
        (d, d), from each (symmetrised) block's eigh, zero outside the block's rows, the
        columns of every block sorted together (ties in flat order). The eigenvectors are
        a dense (d, d) tensor: memory d^2, as PMatDense."""
        per_block = [torch.linalg.eigh((b + b.t()) / 2) for b in self.data.values()]
        evals = torch.cat([e for e, _ in per_block])
        self.evals, order = torch.sort(evals, stable=True)
        self.evecs = torch.block_diag(*(u for _, u in per_block))[:, order]
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def _map(self, fn):
        return PMatBlockDiag(self.layer_collection, OrderedDict((n, fn(b)) for n, b in self.data.items()), self.generator)

    def __add__(self, other):
        self._same_kind(other)
        return PMatBlockDiag(self.layer_collection, OrderedDict((n, b + other.data[n]) for n, b in self.data.items()), self.generator)

    def __sub__(self, other):
        self._same_kind(other)
        return PMatBlockDiag(self.layer_collection, OrderedDict((n, b - other.data[n]) for n, b in self.data.items()), self.generator)

    def __rmul__(self, x):
        return self._map(lambda b: x * b)

    __mul__ = __rmul__
