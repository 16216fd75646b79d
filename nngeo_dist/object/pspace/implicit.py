"""PMatImplicit: M = (1/n) sum_i J_i^T J_i, never formed; each operation is one pass.

Each operation maps over the local shard and sums with ONE all_reduce (DESIGN.md §3): the
buffer carries the partial sum, the example count, a failure flag (a rank that raises
makes every rank raise, naming it, instead of a hang) and, for CG, rank 0's residual so
that every rank takes the same number of iterations. ``mv`` costs a forward-mode pass
(J v) and a backward pass (J^T u) per batch, ``vTMv`` only the forward-mode pass. No d x d
matrix and no per-example gradient is formed.

Linear combinations ``a * M1 + b * M2`` of implicit matrices on the same layers stay
implicit: an operation passes over each term's data and still reduces once.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from ...generator.statistics import no_example_error
from .base import PMatAbstract
from ..groupops import check_model, effective_group, held_group, sum_local_pass


class PMatImplicit(PMatAbstract):
    """Holds the generator and the loader of the local shard; memory O(d).

    ``group``: the process group the loaders are shards of (default: the world group when
    initialised); every operation is collective over it.
    """

    def __init__(self, layer_collection, generator, loader: Iterable, group=None, terms=None):
        super().__init__(layer_collection, generator)
        self.loader = loader
        self.group = held_group(group)
        #: (coefficient, generator, loader) of each term of sum_t coef_t * M_t
        self.terms = list(terms) if terms is not None else [(1.0, generator, loader)]
        self.cg_iterations = 0

    @classmethod
    def build(cls, generator, loader, group=None, check_parameters: bool = True):
        group = effective_group(group)
        check_model(generator.model, group, check_parameters)
        return cls(generator.layer_collection, generator, loader, group)

    # one pass per term, one all_reduce ------------------------------------------------------
    def _tangents(self, v_flat: Tensor):
        from ..vector import PVector

        d = PVector(self.layer_collection, vector_repr=v_flat).get_dict_representation()
        return [t for name in self.layer_collection.layers for t in d[name]]

    def _combine(self, per_term, shape, like: Tensor, carry=()):
        """sum_t coef_t * (group sum of total_t) / (group sum of count_t): every term's
        ``per_term(generator, loader) -> (total, count)`` in one all_reduce."""
        k = len(self.terms)
        m = 1
        for s in shape:
            m *= int(s)
        # sums and counts travel in at least float32: a half-precision count rounds (bf16
        # past 256 examples), and so would the carried CG scalars
        acc = torch.promote_types(like.dtype, torch.float32)

        def local():
            totals, counts = [], []
            for _, gen, loader in self.terms:
                with gen.replaying_draws():  # a Monte-Carlo term is the same matrix every pass
                    total, count = per_term(gen, loader)
                totals.append(total.reshape(-1).to(acc))
                counts.append(float(count))
            return torch.cat(totals + [torch.tensor(counts, dtype=acc, device=like.device)]), 0

        def template():
            return like.new_zeros(k * m + k, dtype=acc)

        flat, _, carried = sum_local_pass(local, template, self.group, carry)
        counts = flat[k * m:]
        if bool((counts == 0).any()):
            raise no_example_error()
        out = sum(coef * flat[i * m:(i + 1) * m] / counts[i] for i, (coef, _, _) in enumerate(self.terms))
        return out.reshape(shape).to(like.dtype), carried

    def _mv_flat(self, x: Tensor, carry=()):
        tangents = self._tangents(x)

        def per_term(gen, loader):
            acc = torch.zeros_like(x)
            count = 0
            for batch, _, jv in gen.jvp_batches(loader, tangents):
                acc += torch.cat([g.reshape(-1) for g in gen.vjp(batch, jv)])
                count += jv.shape[0]
            return acc, count

        return self._combine(per_term, x.shape, x, carry)

    # the interface ------------------------------------------------------------------------
    def mv(self, v):
        self._check_vector(v)
        return self._vector(self._mv_flat(v.to_torch())[0])

    def vTMv(self, v):
        self._check_vector(v)
        x = v.to_torch()
        value = self._vTMv_flat(x.detach())
        if x.requires_grad and torch.is_grad_enabled():  # e.g. an EWC penalty
            return _QuadraticForm.apply(x, value, self)
        return value

    def _vTMv_flat(self, x: Tensor) -> Tensor:
        tangents = self._tangents(x)

        def per_term(gen, loader):
            acc, count = x.new_zeros(()), 0
            for _, _, jv in gen.jvp_batches(loader, tangents):
                acc = acc + (jv * jv).sum()
                count += jv.shape[0]
            return acc, count

        return self._combine(per_term, (), x)[0]

    def trace(self):
        def per_term(gen, loader):
            stats = _diag_statistics(gen, loader, trace_only=True)
            return stats.sums["trace"], stats.count

        like = torch.zeros((), dtype=self.generator.dtype, device=self.generator.device)
        return self._combine(per_term, (), like)[0]

    def get_diag(self):
        def per_term(gen, loader):
            stats = _diag_statistics(gen, loader)
            return stats.sums["diag"], stats.count

        like = torch.zeros((), dtype=self.generator.dtype, device=self.generator.device)
        return self._combine(per_term, (self.layer_collection.numel(),), like)[0]

    def solve(self, v, regul: float = 1e-8, x0=None, tol: float = 1e-10, max_iter: Optional[int] = None):
        """(M + regul I)^{-1} v by conjugate gradients, until ||r|| <= tol ||v||.

        In a group every rank iterates in lockstep: the stopping test uses rank 0's
        residual, which travels inside the all_reduce each iteration needs anyway, so all
        ranks take the same branch (and make the same number of passes, in
        ``self.cg_iterations``). The step whose product reveals convergence is still
        applied (it only reduces the residual), so no pass is wasted.
        """
        self._check_vector(v)
        self._check_regul(regul)
        b = v.to_torch()
        bnorm2 = float(torch.dot(b, b))
        threshold = None  # tol^2 ||b||^2 as rank 0 computed it (agreed through a carry)
        if x0 is None:  # x = 0, r = b: no pass needed
            x, r = torch.zeros_like(b), b.clone()
        else:
            x = x0.to_torch().clone()
            Ax, (agreed,) = self._mv_flat(x, carry=(bnorm2,))
            r = b - (Ax + regul * x)
            threshold = (tol ** 2) * agreed
        p = r.clone()
        rs = torch.dot(r, r)
        max_iter = max_iter or 10 * b.numel()
        self.cg_iterations = 0
        for _ in range(max_iter):
            carry = (float(rs),) if threshold is not None else (float(rs), bnorm2)
            Mp, agreed = self._mv_flat(p, carry=carry)
            if threshold is None:
                threshold = (tol ** 2) * agreed[1]
            rs_agreed = agreed[0]
            converged = rs_agreed <= threshold
            if converged and rs_agreed == 0.0:
                break  # p = r = 0: nothing left to do
            Ap = Mp + regul * p
            alpha = rs / torch.dot(p, Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            self.cg_iterations += 1
            if converged:
                break
            rs_new = torch.dot(r, r)
            p = r + (rs_new / rs) * p
            rs = rs_new
        return self._vector(x)

    def frobenius_norm(self):
        raise self._no("frobenius_norm (it needs every pair of examples)", "PMatLowRank or PMatDense")

    # arithmetic: stays implicit -----------------------------------------------------------
    def _terms_of(self, other) -> list:
        self._same_kind(other)
        if other.group is not self.group:
            raise ValueError("the two implicit matrices run over different process groups")
        return other.terms

    def _with(self, terms) -> "PMatImplicit":
        return PMatImplicit(self.layer_collection, self.generator, self.loader, self.group, terms)

    def __add__(self, other):
        return self._with(self.terms + self._terms_of(other))

    def __sub__(self, other):
        return self._with(self.terms + [(-c, g, l) for c, g, l in self._terms_of(other)])

    def __rmul__(self, x):
        return self._with([(x * c, g, l) for c, g, l in self.terms])

    __mul__ = __rmul__


class _QuadraticForm(torch.autograd.Function):
    """x -> x^T M x (its value computed outside: forward-mode AD is off inside a Function's
    forward) with d/dx = (M + M^T) x = 2 M x: one mv pass, only when a gradient is asked."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, M: "PMatImplicit") -> Tensor:
        ctx.M = M
        ctx.save_for_backward(x)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():  # the pass differentiates the model
            Mx = ctx.M._mv_flat(x.detach())[0].detach()
        return 2 * grad * Mx, None, None


def _diag_statistics(generator, loader, trace_only: bool = False):
    """Diagonal (or trace) sums by per-layer hooks, or, where hooks cannot split a
    parameter's gradient between its uses (a module called twice, tied weights), by
    per-example Jacobians through torch.func."""
    from ...generator.capture import PerLayerCaptureError
    from ...generator.statistics import Statistics

    try:
        return generator.trace_statistics(loader) if trace_only else generator.diag_statistics(loader)
    except PerLayerCaptureError:
        stats = generator.functional_diag_statistics(loader)
        if trace_only:
            return Statistics({"trace": stats.sums["diag"].sum()}, stats.count)
        return stats
