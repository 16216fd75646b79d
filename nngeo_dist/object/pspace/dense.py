"""PMatDense: the full d x d matrix."""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from ..vector import PVector
from ..sums import l2_norm
from .base import PMatAbstract, cholesky_solve, regularised_cholesky, regularised_inverse


class PMatDense(PMatAbstract):
    """Stores M (d, d). Memory d^2; every operation exact.

    ``solve`` keeps the Cholesky factor of M + regul I for the last ``regul`` (d^2 more
    memory, as nngeometry 0.4's cached LDL factor): repeated solves, e.g. natural-gradient
    steps, then cost two triangular solves (2 d^2 FLOPs) instead of a factorisation
    (d^3 / 3). The factor is dropped when ``data`` is replaced or modified in place."""

    #: nngeometry 0.4's ``impl=`` values for ``solve``, all giving the one exact solve
    SOLVE_IMPLS = ("default", "solve", "eigendecomposition")

    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return generator.dense_spec(list(layer_collection.layers))

    def __init__(self, layer_collection, data: Tensor, generator=None):
        super().__init__(layer_collection, generator)
        self.data = data
        self.evals = self.evecs = None
        self._factor_key: Optional[tuple] = None  # (regul, weakref to data, data._version)
        self._factor: Optional[Tensor] = None

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None):
        return cls(layer_collection, stats.mean("dense"), generator)

    def mv(self, v):
        self._check_vector(v)
        return self._vector(self.data @ v.to_torch())

    def vTMv(self, v):
        self._check_vector(v)
        x = v.to_torch()
        return torch.dot(x, self.data @ x)

    def trace(self):
        return torch.trace(self.data)

    def frobenius_norm(self):
        return l2_norm(self.data)

    def get_diag(self):
        return torch.diagonal(self.data)

    def to_torch(self):
        return self.data

    def solve(self, v, regul: float = 1e-8, impl: str = "solve"):
        """(M + regul I)^{-1} v, exactly (Cholesky). ``impl`` exists for nngeometry 0.4
        code: "solve", "eigendecomposition" (and "default") are accepted and all give
        this same exact solve; any other value raises ValueError."""
        self._check_impl("solve", impl, self.SOLVE_IMPLS)
        self._check_vector(v)
        self._check_regul(regul)
        return self._vector(cholesky_solve(self._cholesky(regul), v.to_torch()))

    def _cholesky(self, regul: float) -> Tensor:
        """The Cholesky factor (d, d) of M + regul I: the kept one while ``regul`` and
        ``data`` (the same tensor, not modified in place since: its version counter) are
        unchanged, else computed and kept."""
        key = getattr(self, "_factor_key", None)  # None too for a matrix pickled before it existed
        if (key is None or key[0] != regul or key[1]() is not self.data
                or key[2] != self.data._version):
            self._factor = None  # the old factor's memory is free before the new one's
            self._factor = regularised_cholesky(self.data, regul)
            self._factor_key = (regul, weakref.ref(self.data), self.data._version)
        return self._factor

    def __getstate__(self) -> dict:
        """As every matrix's (see :meth:`PMatAbstract.__getstate__`), less the kept
        Cholesky factor (a cache: d^2 numbers, and a weak reference pickle refuses)."""
        state = super().__getstate__()
        state["_factor_key"] = state["_factor"] = None
        return state

    def _solve_rows(self, rows, solve, args, kw):
        """All rows (m, d) with one factorisation: ``solve``'s arguments bound as it
        would bind them (so its checks and defaults apply), then one Cholesky solve."""
        import inspect

        bound = inspect.signature(solve).bind(self, None, *args, **kw)
        bound.apply_defaults()
        regul = bound.arguments["regul"]
        self._check_impl("solve", bound.arguments["impl"], self.SOLVE_IMPLS)
        self._check_regul(regul)
        return cholesky_solve(self._cholesky(regul), rows.t()).t()

    def inverse(self, regul: float = 1e-8):
        self._check_regul(regul)
        return PMatDense(self.layer_collection, regularised_inverse(self.data, regul), self.generator)

    def compute_eigendecomposition(self, impl: str = "eigh"):
        """Eigenvalues ascending (d,), eigenvectors as columns (d, d).

        ``impl`` exists for nngeometry 0.4 code: "eigh" and "svd" are accepted and both
        give this symmetric eigendecomposition (ascending, unlike 0.4's svd order); any
        other value raises ValueError."""
        self._check_impl("compute_eigendecomposition", impl, ("eigh", "svd"))
        sym = (self.data + self.data.t()) / 2
        self.evals, self.evecs = torch.linalg.eigh(sym)
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def project_to_diag(self, v: PVector) -> Tensor:
        """U^T v (d,): the coordinates of ``v`` in the eigenbasis U of
        :meth:`get_eigendecomposition` (computed on first need), in the order of its
        eigenvalues (ascending), as nngeometry 0.4's ``PMatDense.project_to_diag``."""
        self._check_vector(v)
        return self.get_eigendecomposition()[1].t() @ v.to_torch()

    def project_from_diag(self, x: Tensor) -> PVector:
        """U x: the PVector whose eigenbasis coordinates are ``x`` (d,); the inverse of
        :meth:`project_to_diag`, as nngeometry 0.4's ``PMatDense.project_from_diag``."""
        evecs = self.get_eigendecomposition()[1]
        if x.shape != (evecs.shape[1],):
            raise ValueError(f"expected eigenbasis coordinates of shape ({evecs.shape[1]},); got {tuple(x.shape)}")
        return self._vector(evecs @ x)

    def mm(self, other: "PMatDense") -> "PMatDense":
        """The matrix product M @ other (d, d), as nngeometry's ``PMatDense.mm``."""
        self._same_kind(other)
        return PMatDense(self.layer_collection, self.data @ other.data, self.generator)

    def __add__(self, other):
        self._same_kind(other)
        return PMatDense(self.layer_collection, self.data + other.data, self.generator)

    def __sub__(self, other):
        self._same_kind(other)
        return PMatDense(self.layer_collection, self.data - other.data, self.generator)

    def __rmul__(self, x):
        return PMatDense(self.layer_collection, x * self.data, self.generator)

    __mul__ = __rmul__
