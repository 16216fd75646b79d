"""PMatEKFAC (George et al. 2018): KFAC's Kronecker eigenbasis U_G (x) U_A, with the
diagonal in that basis re-fitted from the data.

Per layer the block is (U_G (x) U_A) diag(D) (U_G (x) U_A)^T with D (o, i'). Built from
KFAC's statistics, D starts as the KFAC eigenvalues outer(evals_G, evals_A), so before
:meth:`PMatEKFAC.update_diag` the matrix equals KFAC. ``update_diag(loader)`` replaces D by
the mean over examples of the squared per-example gradients in the eigenbasis (a second
pass, statistics -> reduce -> finalise like every build).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ...generator.kfac import kfac_spec, kfe_diag_spec, kfe_diag_statistics
from .base import PMatAbstract, reduced_statistics
from .kfac import PMatKFAC, flat_perm, from_kfe, from_mat, singular, to_kfe, to_mat, unsplit


def _check_diag_ok(d, regul, name, layer, what):
    if regul <= 0 and singular(d.reshape(-1).clamp_min(0)):
        raise ValueError(
            f"{what} with regul={regul}: the EKFAC diagonal of layer '{name}' ({layer.kind}) "
            "has zeros (singular); pass a positive regul"
        )


class PMatEKFAC(PMatAbstract):
    """Stores, per layer, the eigenvectors of KFAC's factors U_A (i', i') — None for an
    Embedding, whose A is diagonal — and U_G (o, o), and the diagonal D (o, i') in that
    basis. Memory sum_l (i'_l^2 + o_l^2 + o_l i'_l).

    ``data = (evecs, diags)``: dicts layer -> (U_A, U_G) and layer -> D.
    """

    def __init__(self, layer_collection, evecs: dict, diags: dict, generator=None):
        super().__init__(layer_collection, generator)
        self.data = (
            OrderedDict((n, evecs[n]) for n in layer_collection.layers),
            OrderedDict((n, diags[n]) for n in layer_collection.layers),
        )

    # building ----------------------------------------------------------------------------
    @classmethod
    def statistics_spec(cls, generator, layer_collection):
        return kfac_spec(generator, layer_collection.layers)

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None, eig_dtype=None):
        return cls.from_kfac(PMatKFAC.from_statistics(layer_collection, stats, generator, eig_dtype))

    @classmethod
    def from_kfac(cls, kfac: PMatKFAC) -> "PMatEKFAC":
        """KFAC's eigenbasis, with D = outer(evals_G, evals_A) (equal to KFAC)."""
        evals, evecs = kfac.get_eigendecomposition()
        diags = OrderedDict((n, torch.outer(lg, la)) for n, (la, lg) in evals.items())
        return cls(kfac.layer_collection, OrderedDict(evecs), diags, kfac.generator)

    @classmethod
    def build(cls, generator, loader, group=None, update_diag: bool = False, **kw):
        """KFAC statistics -> reduce -> eigendecompositions; with ``update_diag`` a second
        pass re-fits the diagonal (what EKFAC is for)."""
        out = super().build(generator, loader, group=group, **kw)
        if update_diag:
            out.update_diag(loader, group=group)
        return out

    # the diagonal ----------------------------------------------------------------------------
    def diag_statistics(self, loader):
        """Sums ``kfe/<layer>`` of squared per-example gradients in this eigenbasis over
        ``loader`` (additive; see :meth:`set_diag_from_statistics`)."""
        if self.generator is None:
            raise ValueError(
                "this PMatEKFAC has no generator (model + function): build it with "
                "FIM(..., PMatEKFAC) to be able to update its diagonal"
            )
        return kfe_diag_statistics(self.generator, loader, self.data[0])

    def diag_spec(self, generator=None):
        return kfe_diag_spec(generator or self.generator, self.data[0])

    def set_diag_from_statistics(self, stats) -> None:
        """D <- the means of reduced ``kfe/<layer>`` sums."""
        self.data = (self.data[0], OrderedDict((n, stats.mean(f"kfe/{n}")) for n in self.layer_collection.layers))

    def update_diag(self, loader, group=None) -> None:
        """Re-fit the diagonal from ``loader`` (each rank passes its shard) with the model's
        current parameters: statistics -> reduce over ``group`` -> mean."""
        self.set_diag_from_statistics(reduced_statistics(lambda: self.diag_statistics(loader), group))

    # per-layer plumbing ----------------------------------------------------------------------
    def _map_vector(self, v, fn):
        self._check_vector(v)
        evecs, diags = self.data
        return v.from_layer_flats(
            self.layer_collection,
            {
                n: from_mat(l, fn(n, l, to_kfe(to_mat(l, v.layer_flat(n)), *evecs[n]), diags[n]))
                for n, l in self.layer_collection.layers.items()
            },
        )

    def _back(self, n, x):
        return from_kfe(x, *self.data[0][n])

    # the interface ----------------------------------------------------------------------------
    def mv(self, v):
        return self._map_vector(v, lambda n, l, x, d: self._back(n, x * d))

    def vTMv(self, v):
        self._check_vector(v)
        evecs, diags = self.data
        total = 0
        for n, l in self.layer_collection.layers.items():
            x = to_kfe(to_mat(l, v.layer_flat(n)), *evecs[n])
            total = total + (x * x * diags[n]).sum()
        return total

    def trace(self):
        return sum(d.sum() for d in self.data[1].values())

    def frobenius_norm(self):
        return torch.sqrt(sum((d * d).sum() for d in self.data[1].values()))

    def get_diag(self):
        evecs, diags = self.data
        out = []
        for n, l in self.layer_collection.layers.items():
            ua, ug = evecs[n]
            m = (ug * ug) @ diags[n]
            if ua is not None:
                m = m @ (ua * ua).t()
            out.append(from_mat(l, m))
        return torch.cat(out)

    def get_KFE(self, split_weight_bias: bool = True) -> dict:
        """layer -> the dense eigenbasis (numel, numel): rows in flat order, columns in the
        row-major order of D (o, i'). ``split_weight_bias`` exists for nngeometry 0.4
        code, as in :meth:`PMatKFAC.to_torch`: False orders the rows of a layer with a
        bias as its (o, i') coefficient matrix row-major (the bias last in each row)."""
        evecs, _ = self.data
        out = OrderedDict()
        for n, l in self.layer_collection.layers.items():
            ua, ug = evecs[n]
            o, i = l.math.kfac_dims(l, n)
            if ua is None:
                ua = torch.eye(i, dtype=ug.dtype, device=ug.device)
            kfe = torch.kron(ug.contiguous(), ua.contiguous())
            out[n] = kfe if unsplit(l, split_weight_bias) else kfe[flat_perm(l, ug.device)]
        return out

    def to_torch(self, split_weight_bias: bool = True):
        """The d x d matrix (block diagonal over layers); ``split_weight_bias``: the layout
        of each layer's block, as in :meth:`get_KFE` (True: the flat order)."""
        evecs, diags = self.data
        d = self.layer_collection.numel()
        first = next(iter(diags.values()))
        M = torch.zeros(d, d, dtype=first.dtype, device=first.device)
        for n, kfe in self.get_KFE(split_weight_bias).items():
            s, m = self.layer_collection.p_pos[n], kfe.shape[0]
            M[s:s + m, s:s + m] = (kfe * diags[n].reshape(-1)) @ kfe.t()
        return M

    def solve(self, v, regul: float = 1e-8):
        """(M + regul I)^{-1} v, exactly (diagonal in the eigenbasis)."""
        self._check_vector(v)
        self._check_regul(regul, singular_ok=True)

        def fn(n, l, x, d):
            _check_diag_ok(d, regul, n, l, "solve")
            return self._back(n, x / (d + regul))

        return self._map_vector(v, fn)

    def pow(self, p: float, regul: float = 1e-8):
        """(M + regul I)^p for any real p (as the reference package, regul is added for
        every p)."""
        p = float(p)
        self._check_regul(regul, singular_ok=True)
        evecs, diags = self.data
        out = OrderedDict()
        for n, l in self.layer_collection.layers.items():
            if p < 0:
                _check_diag_ok(diags[n], regul, n, l, f"pow({p})")
            out[n] = (diags[n] + regul) ** p
        return PMatEKFAC(self.layer_collection, evecs, out, self.generator)

    def inverse(self, regul: float = 1e-8):
        return self.pow(-1, regul=regul)

    def __pow__(self, p):
        return self.pow(p)

    def _same_basis(self, other) -> None:
        self._same_kind(other)
        for n, (ua, ug) in self.data[0].items():
            ua2, ug2 = other.data[0][n]
            same_a = (ua is None and ua2 is None) or (ua is not None and ua2 is not None and (ua is ua2 or torch.equal(ua, ua2)))
            if not (same_a and (ug is ug2 or torch.equal(ug, ug2))):
                raise ValueError(
                    f"the two EKFAC matrices have different eigenbases (layer '{n}'): their "
                    "sum is not an EKFAC; convert with to_torch() or use PMatBlockDiag"
                )

    def _with_diags(self, diags):
        return PMatEKFAC(self.layer_collection, self.data[0], diags, self.generator)

    def __add__(self, other):
        self._same_basis(other)
        return self._with_diags(OrderedDict((n, d + other.data[1][n]) for n, d in self.data[1].items()))

    def __sub__(self, other):
        self._same_basis(other)
        return self._with_diags(OrderedDict((n, d - other.data[1][n]) for n, d in self.data[1].items()))

    def __rmul__(self, x):
        return self._with_diags(OrderedDict((n, x * d) for n, d in self.data[1].items()))

    __mul__ = __rmul__


__all__ = ["PMatEKFAC"]
