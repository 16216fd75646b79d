"""PMatLowRank: M = (1/n) J^T J from the stacked per-example Jacobians J (c, n, d)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import PMatAbstract
from ..groupops import group_sum, resolved_group


class PMatLowRank(PMatAbstract):
    """Stores the rows J (c, n_local, d) (row-sharded across ranks in a group) and the
    global example count n. Memory c n d; every operation exact, rank <= c n.
    """

    def __init__(self, layer_collection, data: Tensor, n: int, generator=None, group=None):
        super().__init__(layer_collection, generator)
        self.data = data
        self.n = n
        self.group = group
        self.evals = self.evecs = None

    @classmethod
    def build(cls, generator, loader, group=None):
        group = resolved_group(group)
        rows, n_local = generator.jacobian_rows(loader)
        n = int(group_sum(torch.tensor(float(n_local), dtype=torch.float64, device=rows.device), group).item())
        if n == 0:
            raise ValueError("no example was seen: the loader is empty")
        return cls(generator.layer_collection, rows, n, generator, group)

    def _rows(self) -> Tensor:
        return self.data.reshape(-1, self.data.shape[-1])

    def _sum(self, t: Tensor) -> Tensor:
        return group_sum(t, self.group)

    def mv(self, v):
        self._check_vector(v)
        J = self._rows()
        return self._vector(self._sum(J.t() @ (J @ v.to_torch())) / self.n)

    def vTMv(self, v):
        self._check_vector(v)
        Jv = self._rows() @ v.to_torch()
        return self._sum(torch.dot(Jv, Jv)) / self.n

    def trace(self):
        return self._sum((self.data * self.data).sum()) / self.n

    def get_diag(self):
        return self._sum((self.data * self.data).sum(dim=(0, 1))) / self.n

    def to_torch(self):
        J = self._rows()
        return self._sum(J.t() @ J) / self.n

    def frobenius_norm(self):
        J = self._rows()
        if self.group is None and J.shape[0] < J.shape[1]:
            G = J @ J.t()  # ||J^T J||_F = ||J J^T||_F, the smaller one
            return torch.linalg.matrix_norm(G) / self.n
        return torch.linalg.matrix_norm(self.to_torch())

    def compute_eigendecomposition(self):
        """Nonzero spectrum: eigenvalues ascending (r,), eigenvectors (d, r), r <= c n."""
        if self.group is not None:
            evals, evecs = torch.linalg.eigh(self.to_torch())
        else:
            _, s, vh = torch.linalg.svd(self._rows() / self.n ** 0.5, full_matrices=False)
            evals, evecs = (s * s).flip(0), vh.flip(0).t()
        self.evals, self.evecs = evals, evecs
        return evals, evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def solve(self, v, regul: float = 1e-8):
        """(J^T J / n + regul I)^{-1} v through the eigendecomposition (exact)."""
        self._check_vector(v)
        self._check_regul(regul)
        evals, evecs = self.get_eigendecomposition()
        x = v.to_torch()
        proj = evecs.t() @ x
        return self._vector((x - evecs @ proj) / regul + evecs @ (proj / (evals + regul)))

    def __rmul__(self, x):
        if x < 0:
            raise ValueError("a PMatLowRank J^T J / n is PSD: it can only be scaled by x >= 0")
        return PMatLowRank(self.layer_collection, self.data * x ** 0.5, self.n, self.generator, self.group)

    __mul__ = __rmul__
