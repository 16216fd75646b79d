"""PMatImplicit: M = (1/n) sum_i J_i^T J_i, never formed; each operation is one pass.

Each operation maps over the local shard and sums with one all_reduce (DESIGN.md §3):
``mv`` costs a forward-mode pass (J v) and a backward pass (J^T u) per batch, ``vTMv``
only the forward-mode pass. No d x d matrix and no per-example gradient is formed.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from .base import PMatAbstract
from ..groupops import group_sum, resolved_group


class PMatImplicit(PMatAbstract):
    """Holds the generator and the loader of the local shard; memory O(d)."""

    def __init__(self, layer_collection, generator, loader: Iterable, group=None):
        super().__init__(layer_collection, generator)
        self.loader = loader
        self.group = resolved_group(group)

    @classmethod
    def build(cls, generator, loader, group=None):
        return cls(generator.layer_collection, generator, loader, group)

    def _tangents(self, v):
        d = v.get_dict_representation()
        return [t for name in self.layer_collection.layers for t in d[name]]

    def _mean(self, total: Tensor, count: int) -> Tensor:
        """Sum over the group of (total, count) and divide: one all_reduce."""
        flat = torch.cat([total.reshape(-1), total.new_tensor([float(count)])])
        flat = group_sum(flat, self.group)
        n = flat[-1]
        if n == 0:
            raise ValueError("no example was seen: the loader (or every shard) is empty")
        return (flat[:-1] / n).reshape(total.shape)

    def mv(self, v):
        self._check_vector(v)
        tangents = self._tangents(v)
        acc = torch.zeros_like(v.to_torch())
        count = 0
        for batch, _, jv in self.generator.jvp_batches(self.loader, tangents):
            acc += torch.cat([g.reshape(-1) for g in self.generator.vjp(batch, jv)])
            count += jv.shape[0]
        return self._vector(self._mean(acc, count))

    def vTMv(self, v):
        self._check_vector(v)
        acc = v.to_torch().new_zeros(())
        count = 0
        for _, _, jv in self.generator.jvp_batches(self.loader, self._tangents(v)):
            acc = acc + (jv * jv).sum()
            count += jv.shape[0]
        return self._mean(acc, count)

    def trace(self):
        stats = self.generator.trace_statistics(self.loader)
        return self._mean(stats.sums["trace"], stats.count)

    def get_diag(self):
        stats = self.generator.diag_statistics(self.loader)
        return self._mean(stats.sums["diag"], stats.count)

    def solve(self, v, regul: float = 1e-8, x0=None, tol: float = 1e-10, max_iter: Optional[int] = None):
        """(M + regul I)^{-1} v by conjugate gradients; every rank iterates in lockstep
        (each step's scalars come out of the same all_reduce, so all ranks agree)."""
        self._check_vector(v)
        self._check_regul(regul)
        b = v.to_torch()
        x = torch.zeros_like(b) if x0 is None else x0.to_torch().clone()
        r = b - (self._apply(x) + regul * x)
        p = r.clone()
        rs = torch.dot(r, r)
        bnorm2 = torch.dot(b, b)
        max_iter = max_iter or 10 * b.numel()
        self.cg_iterations = 0
        for _ in range(max_iter):
            if rs <= (tol ** 2) * bnorm2:
                break
            Ap = self._apply(p) + regul * p
            alpha = rs / torch.dot(p, Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = torch.dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
            self.cg_iterations += 1
        return self._vector(x)

    def _apply(self, x: Tensor) -> Tensor:
        return self.mv(self._vector(x)).to_torch()

    def frobenius_norm(self):
        raise self._no("frobenius_norm (it needs every pair of examples)", "PMatLowRank or PMatDense")
