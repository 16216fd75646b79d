"""PMatDiag: the diagonal of M."""
from __future__ import annotations

import torch

from ..sums import l2_norm
from .base import PMatAbstract


class PMatDiag(PMatAbstract):
    """Stores diag(M) (d,). Memory d; exact for a diagonal matrix."""

    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return generator.diag_spec(list(layer_collection.layers))

    def __init__(self, layer_collection, data, generator=None):
        super().__init__(layer_collection, generator)
        self.data = data
        self.evals = self.evecs = None

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
        return l2_norm(self.data)

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

    def mm(self, other: "PMatDiag") -> "PMatDiag":
        """The matrix product M @ other: the elementwise product of the diagonals (d,)."""
        self._same_kind(other)
        return PMatDiag(self.layer_collection, self.data * other.data, self.generator)

    def compute_eigendecomposition(self):
        """Exact and as PMatDense's: eigenvalues ascending (d,), the diagonal sorted (ties
        in flat order), and eigenvectors as columns (d, d), the unit vectors e_i in that
        order. The eigenvectors are a dense (d, d) tensor: memory d^2, as PMatDense."""
        self.evals, order = torch.sort(self.data, stable=True)
        self.evecs = torch.eye(self.data.numel(), dtype=self.data.dtype, device=self.data.device)[:, order]
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def __add__(self, other):
        self._same_kind(other)
        return PMatDiag(self.layer_collection, self.data + other.data, self.generator)

    def __sub__(self, other):
        self._same_kind(other)
        return PMatDiag(self.layer_collection, self.data - other.data, self.generator)

    def __rmul__(self, x):
        return PMatDiag(self.layer_collection, x * self.data, self.generator)

    __mul__ = __rmul__
