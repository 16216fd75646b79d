"""Function-space matrices: the NTK Gram tensor K[a, i, b, j] = J_a(x_i) . J_b(x_j)."""
from __future__ import annotations

import torch
from torch import Tensor

from .vector import FVector


def gram_from_features(generator, feats: list) -> Tensor:
    """(c, n, c, n) from per-batch Gram features; blocks i <= j computed, mirrored below."""
    sizes = [f[0] for f in feats]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    n = offsets[-1]
    K = None
    for bi, fi in enumerate(feats):
        for bj in range(bi, len(feats)):
            block = generator.gram_block(fi, feats[bj])
            if K is None:
                c = block.shape[0]
                K = block.new_zeros((c, n, c, n))
            si = slice(offsets[bi], offsets[bi + 1])
            sj = slice(offsets[bj], offsets[bj + 1])
            K[:, si, :, sj] = block
            if bj != bi:
                K[:, sj, :, si] = block.permute(2, 3, 0, 1)
    return K


class FMatDense:
    """Stores the Gram tensor (c, n, c, n); as a matrix, (c n, c n) output-major."""

    def __init__(self, data: Tensor, generator=None):
        if data.dim() != 4:
            raise ValueError(f"a Gram tensor is (c, n, c, n); got shape {tuple(data.shape)}")
        self.data = data
        self.generator = generator
        self.evals = self.evecs = None

    @classmethod
    def build(cls, generator, loader, group=None):
        return cls(gram_from_features(generator, generator.gram_features(loader)), generator)

    def _matrix(self) -> Tensor:
        c, n = self.data.shape[:2]
        return self.data.reshape(c * n, c * n)

    def to_torch(self) -> Tensor:
        return self.data

    def size(self, dim=None):
        return self.data.size() if dim is None else self.data.size(dim)

    def mv(self, v: FVector) -> FVector:
        c, n = self.data.shape[:2]
        return FVector((self._matrix() @ v.to_torch().reshape(-1)).reshape(c, n))

    def vTMv(self, v: FVector) -> Tensor:
        x = v.to_torch().reshape(-1)
        return torch.dot(x, self._matrix() @ x)

    def trace(self) -> Tensor:
        return torch.diagonal(self._matrix()).sum()

    def frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.data.reshape(-1))

    def get_diag(self) -> Tensor:
        return torch.diagonal(self._matrix())

    def compute_eigendecomposition(self):
        """Eigenvalues ascending (c n,), eigenvectors as columns (c n, c n)."""
        M = self._matrix()
        self.evals, self.evecs = torch.linalg.eigh((M + M.t()) / 2)
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def __add__(self, other: "FMatDense") -> "FMatDense":
        return FMatDense(self.data + other.data, self.generator)

    def __sub__(self, other: "FMatDense") -> "FMatDense":
        return FMatDense(self.data - other.data, self.generator)

    def __rmul__(self, x) -> "FMatDense":
        return FMatDense(x * self.data, self.generator)

    __mul__ = __rmul__
