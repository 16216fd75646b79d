"""PMatQuasiDiag (Ollivier 2015): the diagonal, plus, for each bias coefficient, its
interaction with the weight coefficients of its output unit (the row of the weight for
Linear, the filter for Conv; the weight of the same channel for a normalisation layer).

Per layer with a bias, the matrix is block-diagonal over output units o, each block an
"arrow" [[diag(d_w), c], [c^T, d_b]] over (W[o, :], b[o]); without a bias it is diagonal.
Every operation is closed form per output unit, solve through the Schur complement
s_o = d_b + r - sum_w c_w^2 / (d_w + r).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ...generator.kfac import quasidiag_spec
from .base import PMatAbstract


class PMatQuasiDiag(PMatAbstract):
    """Stores per layer the diagonal (numel,) and, with a bias, the cross terms (numel_w,)
    in the weight's flat order. Memory about 2 d. Exact for a matrix of that pattern.

    ``data[layer] = (diag, cross or None)``.
    """

    def __init__(self, layer_collection, data: dict, generator=None):
        super().__init__(layer_collection, generator)
        self.data = OrderedDict((n, data[n]) for n in layer_collection.layers)
        self._owner_runs = {}  # layer -> (owner, k): see _owner

    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return quasidiag_spec(generator, layer_collection.layers)

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None):
        data = OrderedDict()
        for n, l in layer_collection.layers.items():
            data[n] = (stats.mean(f"qdiag/{n}"), stats.mean(f"qcross/{n}") if l.has_bias else None)
        return cls(layer_collection, data, generator)

    # plumbing -------------------------------------------------------------------------------
    def _owner(self, name, layer, device):
        """(numel_w,) the bias coefficient each weight coefficient interacts with, and the
        number k of coefficients per bias when they are contiguous runs (owner = 0 k
        times, 1 k times, ...: Linear, Conv, normalisation layers), else None."""
        cache = self.__dict__.setdefault("_owner_runs", {})  # absent in a matrix pickled before it existed
        if name not in cache:
            owner = layer.math.quasidiag_owner(layer).to(device)
            b = layer.bias_numel
            k = owner.numel() // b if b and owner.numel() % b == 0 else None
            if k is not None and not torch.equal(owner, torch.arange(b, device=device).repeat_interleave(k)):
                k = None
            cache[name] = (owner, k)
        return cache[name]

    def _spread(self, name, layer, xb):
        """(numel_w,): each weight coefficient's bias entry of ``xb`` (b,), i.e. xb[owner]
        (contiguous runs: a broadcast, no index gather)."""
        owner, k = self._owner(name, layer, xb.device)
        return xb[owner] if k is None else xb.unsqueeze(1).expand(-1, k).reshape(-1)

    def _sum_per_bias(self, name, layer, yw):
        """(b,): the sum of ``yw`` (numel_w,) over each bias's weight coefficients
        (contiguous runs: a row sum, no index_add's scatter)."""
        owner, k = self._owner(name, layer, yw.device)
        if k is None:
            return yw.new_zeros(layer.bias_numel).index_add_(0, owner, yw)
        return yw.reshape(-1, k).sum(1)

    def _split(self, name, layer, x):
        nw = layer.weight_numel
        return x[:nw], x[nw:]

    def _mv_layer(self, name, layer, x):
        d, c = self.data[name]
        if c is None:
            return d * x
        xw, xb = self._split(name, layer, x)
        dw, db = self._split(name, layer, d)
        yw = dw * xw + c * self._spread(name, layer, xb)
        yb = db * xb + self._sum_per_bias(name, layer, c * xw)
        return torch.cat([yw, yb])

    def _per_layer(self, v, fn):
        self._check_vector(v)
        return v.from_layer_flats(
            self.layer_collection,
            {n: fn(n, l, v.layer_flat(n)) for n, l in self.layer_collection.layers.items()},
        )

    # the interface ----------------------------------------------------------------------------
    def mv(self, v):
        return self._per_layer(v, self._mv_layer)

    def vTMv(self, v):
        self._check_vector(v)
        return sum(
            torch.dot(v.layer_flat(n), self._mv_layer(n, l, v.layer_flat(n)))
            for n, l in self.layer_collection.layers.items()
        )

    def trace(self):
        return sum(d.sum() for d, _ in self.data.values())

    def frobenius_norm(self):
        return torch.sqrt(sum((d * d).sum() + (0 if c is None else 2 * (c * c).sum()) for d, c in self.data.values()))

    def get_diag(self):
        return torch.cat([d for d, _ in self.data.values()])

    def to_torch(self):
        dim = self.layer_collection.numel()
        first = next(iter(self.data.values()))[0]
        M = torch.zeros(dim, dim, dtype=first.dtype, device=first.device)
        for n, l in self.layer_collection.layers.items():
            d, c = self.data[n]
            s = self.layer_collection.p_pos[n]
            block = torch.diag(d)
            if c is not None:
                nw = l.weight_numel
                owner = self._owner(n, l, d.device)[0]
                rows = torch.arange(nw, device=d.device)
                block[rows, nw + owner] = c
                block[nw + owner, rows] = c
            M[s:s + l.numel(), s:s + l.numel()] = block
        return M

    def solve(self, v, regul: float = 1e-8):
        """(M + regul I)^{-1} v, exactly, per output unit (Schur complement of the bias)."""
        self._check_vector(v)
        self._check_regul(regul, singular_ok=True)

        def fn(n, l, x):
            d, c = self.data[n]
            dr = d + regul
            scale = d.abs().max() if d.numel() else d.new_tensor(0.0)
            tol = scale * d.numel() * torch.finfo(d.dtype).eps
            if c is None:
                self._check_pivots(n, l, dr, tol, regul)
                return x / dr
            xw, xb = self._split(n, l, x)
            dw, db = self._split(n, l, dr)
            self._check_pivots(n, l, dw, tol, regul)
            cd = c / dw
            s = db - self._sum_per_bias(n, l, cd * c)
            self._check_pivots(n, l, s, tol, regul)
            yb = (xb - self._sum_per_bias(n, l, cd * xw)) / s
            yw = xw / dw - cd * self._spread(n, l, yb)
            return torch.cat([yw, yb])

        return self._per_layer(v, fn)

    @staticmethod
    def _check_pivots(name, layer, pivots, tol, regul):
        if bool((pivots.abs() <= tol).any()) or not bool(torch.isfinite(pivots).all()):
            raise ValueError(
                f"solve with regul={regul}: the quasi-diagonal block of layer '{name}' "
                f"({layer.kind}) is singular; pass a larger positive regul"
            )

    def inverse(self, regul: float = 1e-8):
        raise self._no(
            "inverse (the inverse of a quasi-diagonal matrix is not quasi-diagonal)",
            "solve(v, regul), or PMatBlockDiag",
        )

    def _combine(self, other, op):
        self._same_kind(other)
        data = OrderedDict()
        for n, (d, c) in self.data.items():
            d2, c2 = other.data[n]
            data[n] = (op(d, d2), None if c is None else op(c, c2))
        return PMatQuasiDiag(self.layer_collection, data, self.generator)

    def __add__(self, other):
        return self._combine(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._combine(other, lambda a, b: a - b)

    def __rmul__(self, x):
        data = OrderedDict((n, (x * d, None if c is None else x * c)) for n, (d, c) in self.data.items())
        return PMatQuasiDiag(self.layer_collection, data, self.generator)

    __mul__ = __rmul__


__all__ = ["PMatQuasiDiag"]
