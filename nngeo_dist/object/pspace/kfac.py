"""PMatKFAC: per layer, the block A (x) G (Martens & Grosse 2015; KFC for convolutions,
Grosse & Martens 2016), zero across layers.

Conventions (DESIGN.md §1): with n examples, A = (1/n) sum_n sum_t a a^T (a trailing 1 for a
bias), G = (1/n) sum_n sum_k (1/T) sum_t g g^T. A layer's coefficients, laid out as the
(o, i') matrix V (weight, then the bias as the last column; see
``AffineMath.kfac_to_mat``), are mapped by the block to G V A. In flat order the block is
``kron(G, A)`` permuted to "weight row-major then bias"; for an Embedding, whose flat weight
is (V, D), it is ``kron(A, G)`` with A diagonal (stored as a vector).

Factors are symmetrised before eigendecomposition, negative eigenvalues from round-off are
clipped to zero, and the decomposition runs in ``eig_dtype`` (e.g. float64 for float32
factors) when given. Eigendecompositions are computed once, on first need, and cached.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from ...generator.kfac import kfac_spec
from .base import PMatAbstract


# ----------------------------------------------------------------------------- helpers
# (shared with ekfac.py)


def to_mat(layer, x: Tensor) -> Tensor:
    """(numel,) flat coefficients of one layer -> (o, i')."""
    return layer.math.kfac_to_mat(layer, x)


def from_mat(layer, m: Tensor) -> Tensor:
    """(o, i') -> (numel,) flat coefficients of one layer."""
    return layer.math.kfac_from_mat(layer, m)


def flat_perm(layer, device) -> Tensor:
    """For each flat position of the layer, its index in the row-major (o, i') matrix."""
    o, i = layer.math.kfac_dims(layer)
    return from_mat(layer, torch.arange(o * i, device=device).view(o, i))


def unsplit(layer, split_weight_bias: bool) -> bool:
    """Whether nngeometry 0.4's ``split_weight_bias=False`` layout applies to ``layer``:
    its coefficients in the row-major (o, i') order of the factors (the bias as the last
    entry of each output row) instead of the flat order. Only a layer with a bias differs,
    so only such a layer is laid out so (as 0.4 does)."""
    return not split_weight_bias and layer.has_bias


def right(v: Tensor, a: Tensor) -> Tensor:
    """V A for a factor A stored full (i', i') or as its diagonal (i',)."""
    return v @ a if a.dim() == 2 else v * a


def factor_eigh(f: Tensor, eig_dtype=None) -> tuple[Tensor, Optional[Tensor]]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric PSD factor, in the
    factor's dtype; a diagonal factor (vector) has eigenvectors None (the identity)."""
    dt = f.dtype
    x = f if eig_dtype is None else f.to(eig_dtype)
    if x.dim() == 1:
        return x.clamp_min(0).to(dt), None
    x = (x + x.t()) / 2
    evals, evecs = torch.linalg.eigh(x)
    return evals.clamp_min(0).to(dt), evecs.to(dt).contiguous()


def singular(evals: Tensor) -> bool:
    """Whether eigenvalues (>= 0) contain a zero, at the usual rank tolerance."""
    if evals.numel() == 0:
        return False
    top = evals.max()
    tol = top * evals.numel() * torch.finfo(evals.dtype).eps
    return bool((evals <= tol).any())


def pi_heuristic(a: Tensor, g: Tensor) -> float:
    """Martens & Grosse (2015): pi = sqrt((tr A / dim A) / (tr G / dim G)); 1 if undefined."""
    tr_a = (a.sum() if a.dim() == 1 else torch.trace(a)).item() / a.shape[0]
    tr_g = torch.trace(g).item() / g.shape[0]
    if not (tr_a > 0 and tr_g > 0 and math.isfinite(tr_a) and math.isfinite(tr_g)):
        return 1.0
    return math.sqrt(tr_a / tr_g)


def to_kfe(v: Tensor, ua: Optional[Tensor], ug: Tensor) -> Tensor:
    """Coordinates of V (o, i') in the eigenbasis: U_G^T V U_A."""
    x = ug.t() @ v
    return x if ua is None else x @ ua


def from_kfe(x: Tensor, ua: Optional[Tensor], ug: Tensor) -> Tensor:
    """Inverse of :func:`to_kfe`: U_G X U_A^T."""
    y = ug @ x
    return y if ua is None else y @ ua.t()


def _fn_of_factor(evals: Tensor, evecs: Optional[Tensor], fvals: Tensor) -> Tensor:
    """U diag(fvals) U^T (or the vector fvals for a diagonal factor)."""
    if evecs is None:
        return fvals
    return (evecs * fvals) @ evecs.t()


def _pow(x: Tensor, p: float) -> Tensor:
    if p == 1:
        return x
    if p == -1:
        return 1.0 / x
    return x ** p


# ----------------------------------------------------------------------------- PMatKFAC


class PMatKFAC(PMatAbstract):
    """Stores, per layer, A (i', i') — (V,) for an Embedding — and G (o, o).
    Memory sum_l (i'_l^2 + o_l^2). Exact for one example per layer input with a single
    spatial position; an approximation otherwise.

    ``data[layer] = (A, G)`` are the factors; ``get_eigendecomposition()`` their
    eigendecompositions (computed on first need).
    """

    def __init__(self, layer_collection, data: dict, generator=None, eig_dtype=None):
        super().__init__(layer_collection, generator)
        self.data = OrderedDict((n, data[n]) for n in layer_collection.layers)
        self.eig_dtype = eig_dtype
        self.evals = self.evecs = None

    # building ----------------------------------------------------------------------------
    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return kfac_spec(generator, layer_collection.layers)

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None, eig_dtype=None):
        for name, layer in layer_collection.layers.items():
            layer.math.kfac_dims(layer, name)  # a clear error for a layer KFAC cannot factor
        data = OrderedDict(
            (n, (stats.mean(f"A/{n}"), stats.mean(f"G/{n}"))) for n in layer_collection.layers
        )
        return cls(layer_collection, data, generator, eig_dtype)

    # factors and eigendecompositions ---------------------------------------------------------
    def compute_eigendecomposition(self, impl: str = "eigh", eig_dtype=None):
        """Eigendecompositions of every factor: returns (evals, evecs), two dicts layer ->
        (of A, of G); eigenvalues ascending for full factors, clipped at 0; an Embedding's
        A is diagonal: its eigenvalues are its diagonal and its eigenvectors None.

        ``impl`` exists for nngeometry 0.4 code: only "eigh" (0.4's one value) is
        accepted; any other value raises ValueError. ``eig_dtype``: decompose in this
        dtype (default: the one this matrix was built with, else the factors')."""
        self._check_impl("compute_eigendecomposition", impl, ("eigh",))
        eig_dtype = eig_dtype or self.eig_dtype
        self.evals, self.evecs = OrderedDict(), OrderedDict()
        for name, (a, g) in self.data.items():
            la, ua = factor_eigh(a, eig_dtype)
            lg, ug = factor_eigh(g, eig_dtype)
            self.evals[name] = (la, lg)
            self.evecs[name] = (ua, ug)
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    # per-layer plumbing ----------------------------------------------------------------------
    def _layers(self):
        for name, layer in self.layer_collection.layers.items():
            yield name, layer, self.data[name]

    def _map_vector(self, v, fn):
        """Apply ``fn(name, layer, V (o, i')) -> (o, i')`` layer by layer."""
        self._check_vector(v)
        return v.from_layer_flats(
            self.layer_collection,
            {n: from_mat(l, fn(n, l, to_mat(l, v.layer_flat(n)))) for n, l in self.layer_collection.layers.items()},
        )

    # the interface ----------------------------------------------------------------------------
    def mv(self, v):
        return self._map_vector(v, lambda n, l, x: self.data[n][1] @ right(x, self.data[n][0]))

    def vTMv(self, v):
        self._check_vector(v)
        total = 0
        for n, l, (a, g) in self._layers():
            x = to_mat(l, v.layer_flat(n))
            total = total + (x * (g @ right(x, a))).sum()
        return total

    def trace(self):
        return sum((a.sum() if a.dim() == 1 else torch.trace(a)) * torch.trace(g) for a, g in self.data.values())

    def frobenius_norm(self):
        return torch.sqrt(sum((a * a).sum() * (g * g).sum() for a, g in self.data.values()))

    def get_diag(self, split_weight_bias: bool = True):
        """The diagonal (d,). ``split_weight_bias`` exists for nngeometry 0.4 code, as in
        :meth:`to_torch`: True is the flat order; False lays out each layer with a bias as
        its (o, i') coefficient matrix row-major (the bias last in each output row)."""
        out = []
        for n, l, (a, g) in self._layers():
            da = a if a.dim() == 1 else torch.diagonal(a)
            m = torch.outer(torch.diagonal(g), da)
            out.append(m.reshape(-1) if unsplit(l, split_weight_bias) else from_mat(l, m))
        return torch.cat(out)

    def to_torch(self, split_weight_bias: bool = True):
        """The d x d matrix (block diagonal over layers) in the flat parameter order.

        ``split_weight_bias`` exists for nngeometry 0.4 code. True (0.4's default) is the
        flat order: each layer's weight, then its bias. False lays each layer that has a
        bias out as 0.4 does: the (o, i') coefficient matrix row-major, the bias as the
        last entry of each output row, i.e. the block is kron(G, A) unpermuted; a layer
        without a bias is the same under both."""
        d = self.layer_collection.numel()
        first = next(iter(self.data.values()))[1]
        M = torch.zeros(d, d, dtype=first.dtype, device=first.device)
        for n, l, (a, g) in self._layers():
            full_a = torch.diag(a) if a.dim() == 1 else a
            s = self.layer_collection.p_pos[n]
            if unsplit(l, split_weight_bias):
                M[s:s + l.numel(), s:s + l.numel()] = torch.kron(g, full_a)
                continue
            perm = flat_perm(l, g.device)
            M[s:s + l.numel(), s:s + l.numel()] = torch.kron(g, full_a)[perm][:, perm]
        return M

    def _dampings(self, name, regul, use_pi):
        a, g = self.data[name]
        if not use_pi:
            return None
        pi = pi_heuristic(a, g)
        r = math.sqrt(regul)
        return pi * r, r / pi

    def _check_invertible(self, name, layer, regul, what):
        (la, lg) = self.get_eigendecomposition()[0][name]
        if regul <= 0 and (singular(la) or singular(lg)):
            raise ValueError(
                f"{what} with regul={regul}: a KFAC factor of layer '{name}' ({layer.kind}) is "
                "singular; pass a positive regul"
            )

    def solve(self, v, regul: float = 1e-8, use_pi: bool = True, impl: str = "default"):
        """(F + regul I)^{-1} v: with ``use_pi``, the damping is split across the factors,
        (A + pi sqrt(regul) I) (x) (G + sqrt(regul)/pi I) (Martens & Grosse 2015); without,
        (A (x) G + regul I)^{-1} exactly, through the factors' eigendecompositions.

        ``impl`` exists for nngeometry 0.4 code: only "default" (0.4's one value) is
        accepted; any other value raises ValueError."""
        self._check_impl("solve", impl, ("default",))
        self._check_vector(v)
        self._check_regul(regul, singular_ok=True)
        evals, evecs = self.get_eigendecomposition()

        def fn(n, l, x):
            self._check_invertible(n, l, regul, "solve")
            (la, lg), (ua, ug) = evals[n], evecs[n]
            damp = self._dampings(n, regul, use_pi)
            if damp is None:
                denom = torch.outer(lg, la) + regul
            else:
                denom = torch.outer(lg + damp[1], la + damp[0])
            return from_kfe(to_kfe(x, ua, ug) / denom, ua, ug)

        return self._map_vector(v, fn)

    def pow(self, p: float, regul: float = 1e-8, use_pi: bool = True):
        """(F + regul I)^p for any real p. With ``use_pi``: the PMatKFAC of factors
        (A + pi sqrt(regul) I)^p and (G + sqrt(regul)/pi I)^p; without: the exact power
        of A (x) G + regul I, which shares KFAC's eigenbasis but is not a Kronecker
        product: returned as a PMatEKFAC."""
        p = float(p)
        self._check_regul(regul, singular_ok=True)
        evals, evecs = self.get_eigendecomposition()
        if not use_pi:
            from .ekfac import PMatEKFAC

            diags = OrderedDict()
            for n, l, _ in self._layers():
                if p < 0:
                    self._check_invertible(n, l, regul, f"pow({p})")
                (la, lg) = evals[n]
                diags[n] = _pow(torch.outer(lg, la) + regul, p)
            return PMatEKFAC(self.layer_collection, OrderedDict(evecs), diags, self.generator)
        data, out_evals = OrderedDict(), OrderedDict()
        for n, l, _ in self._layers():
            if p < 0:
                self._check_invertible(n, l, regul, f"pow({p})")
            (la, lg), (ua, ug) = evals[n], evecs[n]
            da, dg = self._dampings(n, regul, True)
            ea, eg = _pow(la + da, p), _pow(lg + dg, p)
            data[n] = (_fn_of_factor(la, ua, ea), _fn_of_factor(lg, ug, eg))
            out_evals[n] = (ea, eg)
        out = PMatKFAC(self.layer_collection, data, self.generator, self.eig_dtype)
        # the result's eigendecomposition is known (same eigenvectors; values not sorted)
        out.evals, out.evecs = out_evals, OrderedDict(evecs)
        return out

    def inverse(self, regul: float = 1e-8, use_pi: bool = True):
        """(F + regul I)^{-1}: see :meth:`pow`."""
        return self.pow(-1, regul=regul, use_pi=use_pi)

    def __pow__(self, p):
        return self.pow(p)

    def mm(self, other: "PMatKFAC") -> "PMatKFAC":
        """The product of two KFAC matrices on the same layers (factor by factor)."""
        self._same_kind(other)
        data = OrderedDict()
        for n, (a, g) in self.data.items():
            a2, g2 = other.data[n]
            data[n] = (a * a2 if a.dim() == 1 else a @ a2, g @ g2)
        return PMatKFAC(self.layer_collection, data, self.generator, self.eig_dtype)

    def __add__(self, other):
        raise self._no("+", "to_torch() or PMatBlockDiag (a sum of Kronecker products is not one)")

    def __sub__(self, other):
        raise self._no("-", "to_torch() or PMatBlockDiag (a difference of Kronecker products is not one)")

    def __rmul__(self, x):
        x = float(x) if not isinstance(x, Tensor) else x
        if x < 0:  # its factors' eigendecompositions (solve, inverse, pow) assume PSD factors
            raise ValueError(
                f"PMatKFAC keeps A (x) G as two PSD factors, whose eigenvalues solve, inverse and "
                f"pow clip at 0: it can only be scaled by x >= 0, not {float(x)}; for a negative "
                "multiple scale a PMatEKFAC (PMatEKFAC.from_kfac) or to_torch()"
            )
        data = OrderedDict((n, (a, x * g)) for n, (a, g) in self.data.items())
        return PMatKFAC(self.layer_collection, data, self.generator, self.eig_dtype)

    __mul__ = __rmul__


__all__ = ["PMatKFAC"]
