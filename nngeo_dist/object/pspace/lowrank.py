"""PMatLowRank: M = (1/n) J^T J from the stacked per-example Jacobians J (c, n, d).

In a process group the rows are sharded: rank r holds ``data`` = its examples' rows
(c, n_r, d) and n is the global example count. What lands in parameter space is summed
over the group (one all_reduce: J^T J v, v^T J^T J v, trace, the diagonal, the d x d
matrix); nothing of size n is ever gathered unless asked:

- ``local`` / ``data``: this rank's rows (c, n_r, d);
- ``to_torch()``: the d x d matrix, on every rank (one all_reduce of d^2);
- ``gather(dst=None)``: a one-process PMatLowRank holding every row (c, n, d), on every
  rank or on rank ``dst`` only;
- ``frobenius_norm()``: through the (c n)^2 Gram of the rows when c n < d (each rank's
  rows are broadcast in turn), else through the d x d matrix;
- ``compute_eigendecomposition()``: computed on rank 0 from the R factors of every rank's
  rows (each rank sends min(c n_r, d) rows), broadcast: identical bits on every rank.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...generator.statistics import no_example_error
from .base import PMatAbstract
from ..sums import l2_norm, sum_of_squares
from ..groupops import (
    RowLayout,
    check_model,
    effective_group,
    held_group,
    group_rank,
    group_size,
    group_sum,
)


def _nonzero_spectrum(rows: Tensor, n: int, m: int, d: int):
    """Eigenvalues ascending and eigenvectors (d, r) of rows^T rows / n, dropping the
    eigenvalues that are zero to working precision (<= max * max(m, d) * eps)."""
    # rows are not scaled (a copy of J): the singular values are; the kept vectors are
    # reversed into ascending order and laid out (d, r) by one gather
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    evals = s * s / n  # descending
    r = evals.numel()
    if r:
        cut = evals[0] * max(m, d) * torch.finfo(evals.dtype).eps
        r = int((evals > cut).sum())  # a prefix: the values descend
    ascending = torch.arange(r - 1, -1, -1, device=vh.device)
    return evals[:r].flip(0), vh[:r].t()[:, ascending]


class PMatLowRank(PMatAbstract):
    """Stores the rows J (c, n_local, d) (row-sharded across ranks in a group) and the
    global example count n. Memory c n d (c n_r d per rank); every operation exact,
    rank <= c n.
    """

    def __init__(self, layer_collection, data: Tensor, n: int, generator=None, group=None,
                 layout: RowLayout = None):
        super().__init__(layer_collection, generator)
        self.data = data
        self.n = n
        self.group = held_group(group)
        self.layout = RowLayout.of(data.shape[1], self.group, layout)
        self.evals = self.evecs = None

    @classmethod
    def build(cls, generator, loader, group=None, check_parameters: bool = True, store=None):
        from ..groupops import refuse_store
        from ..map import jacobian_rows

        refuse_store("PMatLowRank", "PMatLowRankStored", store)
        group = effective_group(group)
        check_model(generator.model, group, check_parameters)
        rows, layout, group = jacobian_rows(generator, loader, group)
        if layout.n == 0:
            raise no_example_error()
        return cls(generator.layer_collection, rows, layout.n, generator, group, layout)

    @property
    def local(self) -> Tensor:
        """(c, n_r, d): this rank's rows."""
        return self.data

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
        return self._sum(sum_of_squares(self.data)) / self.n

    def get_diag(self):
        return self._sum(sum_of_squares(self._rows(), dim=0)) / self.n

    def to_torch(self):
        """The d x d matrix, on every rank."""
        J = self._rows()
        return self._sum(J.t() @ J) / self.n

    def gather(self, dst=None):
        """A one-process PMatLowRank with every rank's rows (c, n, d): on every rank, or on
        rank ``dst`` only (``None`` on the others). Collective in a group."""
        if self.group is None:
            return self
        from ...dist.exchange import all_gather_rows, gather_rows

        if dst is None:
            full = all_gather_rows(self.data, dim=1, group=self.group)
        else:
            full = gather_rows(self.data, dim=1, dst=dst, group=self.group)
            if full is None:
                return None
        return PMatLowRank(self.layer_collection, full, self.n, self.generator)

    def save(self, path, **kw) -> str:
        """Write to a zarr v3 store (see :func:`nngeo_dist.store.objects.save`); in a group
        every rank calls it and writes its own rows."""
        from ...store.objects import save

        return save(self, path, **kw)

    def _row_counts(self) -> list:
        """Rows (c n_r) of every rank."""
        return [self.data.shape[0] * k for k in self.layout.counts]

    def frobenius_norm(self):
        J = self._rows()
        m, d = sum(self._row_counts()), J.shape[1]
        if self.group is None:
            if J.shape[0] < J.shape[1]:
                return l2_norm(J @ J.t()) / self.n  # ||J^T J|| = ||J J^T||
            return l2_norm(self.to_torch())
        if m >= d:
            return l2_norm(self.to_torch())
        # ||J J^T||_F^2 = sum_{r,s} ||J_r J_s^T||^2 = sum_r ||J_r J_r^T||^2 + 2 sum_{r<s} ...
        from ...dist.exchange import broadcast_from

        me, counts = group_rank(self.group), self._row_counts()
        acc = J.new_zeros(())
        for s in range(group_size(self.group)):
            if counts[s] == 0:
                continue
            Js = broadcast_from(J if s == me else None, s, self.group,
                                shape=(counts[s], d), dtype=J.dtype, device=J.device)
            if s == me:
                acc = acc + (J @ J.t()).pow(2).sum()
            elif s > me:
                acc = acc + 2 * (J @ Js.t()).pow(2).sum()
        return self._sum(acc).sqrt() / self.n

    def compute_eigendecomposition(self, impl: str = "svd"):
        """Nonzero spectrum: eigenvalues ascending (r,), eigenvectors (d, r), r <= c n
        (eigenvalues below max * max(c n, d) * eps are dropped as zero).

        ``impl`` exists for nngeometry 0.4 code: only "svd" (0.4's one value) is
        accepted; any other value raises ValueError.

        In a group: each rank reduces its rows to min(c n_r, d) rows with the same Gram
        (their R factor when c n_r > d), rank 0 gathers them and decomposes by SVD, and
        broadcasts the result, so every rank holds the same bits."""
        self._check_impl("compute_eigendecomposition", impl, ("svd",))
        J = self._rows()
        d = J.shape[1]
        m = sum(self._row_counts())
        if self.group is None:
            self.evals, self.evecs = _nonzero_spectrum(J, self.n, m, d)
            return self.evals, self.evecs
        from ...dist.errors import collective_errors
        from ...dist.exchange import broadcast_from, gather_rows

        R = J
        with collective_errors(self.group):  # a rank failing must not leave the others waiting
            if J.shape[0] > d:
                R = torch.linalg.qr(J, mode="r").R
        stacked = gather_rows(R, dim=0, dst=0, group=self.group)
        evals = evecs = None
        with collective_errors(self.group):
            if stacked is not None:
                evals, evecs = _nonzero_spectrum(stacked, self.n, m, d)
        # the rank as an integer: in J's dtype a half-precision J would round it (bf16 past
        # 256), and ranks would then wait for buffers of different sizes
        r = broadcast_from(None if evals is None else torch.tensor([evals.numel()], device=J.device),
                           0, self.group, shape=(1,), dtype=torch.int64, device=J.device)
        r = int(r.item())
        self.evals = broadcast_from(evals, 0, self.group, shape=(r,), dtype=J.dtype, device=J.device)
        self.evecs = broadcast_from(evecs, 0, self.group, shape=(d, r), dtype=J.dtype, device=J.device)
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def solve(self, v, regul: float = 1e-8, impl: str = "svd"):
        """(J^T J / n + regul I)^{-1} v through the eigendecomposition (exact).

        ``impl`` exists for nngeometry 0.4 code: "svd" and "default" (0.4's values) are
        accepted and give this exact solve; any other value raises ValueError."""
        self._check_impl("solve", impl, ("default", "svd"))
        self._check_vector(v)
        self._check_regul(regul)
        evals, evecs = self.get_eigendecomposition()
        x = v.to_torch()
        proj = evecs.t() @ x
        return self._vector((x - evecs @ proj) / regul + evecs @ (proj / (evals + regul)))

    # arithmetic ---------------------------------------------------------------------------
    def __rmul__(self, x):
        if x < 0:
            raise ValueError("a PMatLowRank J^T J / n is PSD: it can only be scaled by x >= 0")
        return PMatLowRank(self.layer_collection, self.data * x ** 0.5, self.n, self.generator,
                           self.group, self.layout)

    __mul__ = __rmul__

    def __add__(self, other):
        """J_1^T J_1 / n_1 + J_2^T J_2 / n_2 = [J_1 / sqrt(n_1); J_2 / sqrt(n_2)]^T [...]:
        still low rank, rows stacked (per rank in a group), n = 1."""
        self._same_kind(other)
        if other.group is not self.group:  # each rank stacks its own rows of both
            raise ValueError("the two low-rank matrices live on different process groups: "
                             "build both on the same group")
        d = self.data.shape[-1]
        rows = torch.cat([self._rows() / self.n ** 0.5, other._rows() / other.n ** 0.5]).reshape(1, -1, d)
        ca, cb = self.data.shape[0], other.data.shape[0]
        layout = None
        if self.group is not None:
            layout = RowLayout(tuple(ca * a + cb * b for a, b in zip(self.layout.counts, other.layout.counts)),
                               self.layout.rank)
        return PMatLowRank(self.layer_collection, rows, 1, self.generator, self.group, layout)

    def __sub__(self, other):
        raise self._no("subtraction (the difference of two J^T J is not PSD, so not of this form)",
                       "PMatDense")
