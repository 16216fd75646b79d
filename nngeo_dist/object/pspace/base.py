"""The contract of every parameter-space matrix (PMat*), and how each is built.

Building is ``statistics -> reduce -> finalise`` (DESIGN.md §3): :meth:`PMatAbstract.build`
asks the generator for the representation's additive sums over the local shard, reduces
them over the process group, and hands them to :meth:`from_statistics`, which divides by
the global example count and does whatever needs the whole (eigendecompositions).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from ...generator.kfac import StatSpec, run_spec
from ...generator.statistics import Statistics
from ...layercollection import LayerCollection
from ..vector import PVector

if TYPE_CHECKING:  # map.py imports this module
    from ..map import PushForwardDense


def _solving_push_forwards(solve):
    """``solve`` of a representation, also taking nngeometry 0.4's other right-hand side, a
    PushForwardDense J, solved row by row with the same arguments (see
    :meth:`PMatAbstract.solvePFMap`). ``functools.wraps`` keeps the signature visible to
    ``inspect`` (``solvePVec`` reads whether ``solve`` takes ``impl``)."""

    @functools.wraps(solve)
    def wrapped(self, b, *args, **kw):
        from ..map import PushForwardDense  # map.py imports this module

        if isinstance(b, PushForwardDense):
            return self._solve_push_forward(b, solve, args, kw)
        return solve(self, b, *args, **kw)

    return wrapped


class PMatAbstract:
    """A d x d matrix of parameter space, d = layer_collection.numel()."""

    def __init__(self, layer_collection: LayerCollection, generator=None):
        self.layer_collection = layer_collection
        self.generator = generator

    def __init_subclass__(cls, **kw):
        # every representation's own solve accepts a PushForwardDense as nngeometry 0.4's
        # does: wrapped here once rather than tested for in each of them
        super().__init_subclass__(**kw)
        if "solve" in cls.__dict__:
            cls.solve = _solving_push_forwards(cls.__dict__["solve"])

    # building ---------------------------------------------------------------------------
    @classmethod
    def statistics_spec(cls, generator, layer_collection: LayerCollection) -> StatSpec:
        """The additive sums this representation is built from, over the layers of
        ``layer_collection`` (the generator's, or a part of it)."""
        raise NotImplementedError(f"{cls.__name__} is not built from additive statistics")

    @classmethod
    def has_statistics(cls) -> bool:
        return cls.statistics_spec.__func__ is not PMatAbstract.statistics_spec.__func__

    @classmethod
    def statistics(cls, generator, loader) -> Statistics:
        """This representation's sums over ``loader``, in one pass."""
        spec = cls.statistics_spec(generator, generator.layer_collection)
        return run_spec(generator, loader, spec, cls.__name__)

    @classmethod
    def from_statistics(cls, layer_collection: LayerCollection, stats: Statistics, generator=None, **kw):
        raise NotImplementedError

    @classmethod
    def build(cls, generator, loader, group=None, **kw) -> "PMatAbstract":
        """statistics over the local shard -> reduce over ``group`` -> finalise."""
        stats = reduced_statistics(lambda: cls.statistics(generator, loader), group)
        return cls.from_statistics(generator.layer_collection, stats, generator=generator, **kw)

    # the interface ----------------------------------------------------------------------
    def mv(self, v: PVector) -> PVector:
        raise self._no("mv", "PMatDense or PMatBlockDiag")

    def vTMv(self, v: PVector) -> Tensor:
        self._check_vector(v)
        return torch.dot(self.mv(v).to_torch(), v.to_torch())

    def trace(self) -> Tensor:
        return self.get_diag().sum()

    def frobenius_norm(self) -> Tensor:
        raise self._no("frobenius_norm", "PMatDense")

    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        """(M + regul I)^{-1} v."""
        raise self._no("solve", "PMatDense, PMatDiag, PMatBlockDiag or PMatKFAC")

    def solvePVec(self, v: PVector, regul: float = 1e-8, impl: str = "default", **kw) -> PVector:
        """``solve(v, regul)`` for a PVector, under nngeometry 0.4's name and signature;
        exists for nngeometry 0.4 code. ``impl`` is passed on to ``solve`` where it takes
        one (PMatDense, PMatLowRank, PMatKFAC); elsewhere only ``impl="default"`` is
        accepted (ValueError otherwise). Extra keywords (e.g. KFAC's ``use_pi``) go to
        ``solve``."""
        import inspect

        if "impl" in inspect.signature(self.solve).parameters:
            return self.solve(v, regul=regul, impl=impl, **kw)
        self._check_impl("solvePVec", impl, ("default",))
        return self.solve(v, regul=regul, **kw)

    def solvePFMap(self, J: "PushForwardDense", regul: float = 1e-8, impl: str = "default",
                   **kw) -> "PushForwardDense":
        """(M + regul I)^{-1} applied to every row J_k(x_i) (d,) of a PushForwardDense J
        (c, n, d): a PushForwardDense of the same shape, as nngeometry 0.4's
        ``solvePFMap``; ``impl`` and extra keywords as in :meth:`solvePVec` (whose
        dispatch this shares: ``solve`` takes push-forwards too)."""
        return self.solvePVec(J, regul=regul, impl=impl, **kw)

    def _solve_push_forward(self, J: "PushForwardDense", solve: Callable, args: tuple, kw: dict) -> "PushForwardDense":
        """``solve(self, row, *args, **kw)`` on each row of J (c, n, d) -> a
        PushForwardDense (c, n, d); a representation that can solve many right-hand sides
        at once overrides :meth:`_solve_rows`."""
        if getattr(J, "group", None) is not None:
            # each rank holds other rows, and a collective solve (a sharded PMatLowRank,
            # PMatImplicit in a group) would be called a different number of times per rank
            raise ValueError(
                "solving a row-sharded push-forward (built in a process group) is not supported: "
                "solve J.gather() (the whole J, on every rank)"
            )
        if J.layer_collection != self.layer_collection:
            raise ValueError("the push-forward lives on another LayerCollection than this matrix")
        rows = J.data.reshape(-1, J.data.shape[-1])
        return J._like(type(J), self._solve_rows(rows, solve, args, kw).reshape(J.data.shape))

    def _solve_rows(self, rows: Tensor, solve: Callable, args: tuple, kw: dict) -> Tensor:
        """(m, d): ``solve`` (this class's own, unwrapped) on each row of ``rows`` (m, d)."""
        return torch.stack([solve(self, self._vector(r), *args, **kw).to_torch() for r in rows])

    def inverse(self, regul: float = 1e-8) -> "PMatAbstract":
        raise self._no("inverse", "PMatDense, PMatDiag, PMatBlockDiag or PMatKFAC")

    def get_diag(self) -> Tensor:
        raise self._no("get_diag", "PMatDiag or PMatDense")

    def mm(self, other: "PMatAbstract") -> "PMatAbstract":
        """The matrix product M @ other, both of this representation on the same layers."""
        raise self._no("mm", "PMatDense, PMatDiag, PMatBlockDiag or PMatKFAC")

    def compute_eigendecomposition(self):
        """Eigenvalues ascending and eigenvectors as columns, where exact (see each class)."""
        raise self._no("compute_eigendecomposition", _EIG_INSTEAD)

    def get_eigendecomposition(self):
        raise self._no("get_eigendecomposition", _EIG_INSTEAD)

    def to_torch(self) -> Tensor:
        raise self._no("to_torch", "PMatDense")

    def size(self, dim: Optional[int] = None):
        d = self.layer_collection.numel()
        s = torch.Size([d, d])
        return s if dim is None else s[dim]

    def save(self, path, **kw) -> None:
        """Write this matrix to a zarr v3 store (see nngeo_dist.store.objects.save)."""
        from ...store.objects import save

        save(self, path, **kw)

    # pickling -------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything but the generator (the model and a function, often a closure: not
        picklable); see :func:`picklable_state`."""
        return picklable_state(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # helpers ------------------------------------------------------------------------------
    def _no(self, op: str, instead: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__} has no closed form for {op}; use {instead} instead"
        )

    def _check_impl(self, op: str, impl, accepted) -> None:
        check_impl(type(self).__name__, op, impl, accepted)

    def _check_vector(self, v: PVector) -> None:
        if not isinstance(v, PVector):
            raise TypeError(f"expected a PVector, got {type(v).__name__}")
        if v.layer_collection is not self.layer_collection and v.layer_collection != self.layer_collection:
            raise ValueError(
                "the PVector belongs to another LayerCollection than this matrix: build it "
                "with PVector.from_model(model, F.layer_collection) or on the same layers"
            )

    def _vector(self, flat: Tensor) -> PVector:
        return PVector(self.layer_collection, vector_repr=flat)

    def _check_regul(self, regul: float, singular_ok: bool = False) -> None:
        if regul < 0 or (regul == 0 and not singular_ok):
            raise ValueError(
                f"regul={regul}: the matrix may be singular; pass a positive Tikhonov "
                "damping regul (e.g. 1e-8 times its trace / d)"
            )

    def _same_kind(self, other) -> None:
        if type(other) is not type(self):
            raise TypeError(
                f"cannot combine {type(self).__name__} with {type(other).__name__}: convert "
                "both to one representation first"
            )
        if other.layer_collection != self.layer_collection:
            raise ValueError("the two matrices live on different LayerCollections")


def check_impl(owner: str, op: str, impl, accepted) -> None:
    """ValueError unless ``impl`` is one of the nngeometry 0.4 values ``accepted`` for
    ``owner.op`` (a class name and a method name, for the message). ``impl=`` exists for
    0.4 code only: what is computed is ours whatever the accepted value."""
    if impl not in accepted:
        raise ValueError(
            f"{owner}.{op}: impl={impl!r} is not supported; accepted: "
            + ", ".join(repr(a) for a in accepted)
        )


def reduced_statistics(local: Callable[[], Statistics], group=None) -> Statistics:
    """``local()`` (a pass over this rank's shard) summed over ``group``: a rank whose
    pass raises is named on every rank, before the reduction it would leave waiting."""
    from ...dist.errors import collective_errors

    with collective_errors(group):
        stats = local()
    return stats.reduce(group)


_EIG_INSTEAD = "PMatDense, PMatLowRank, PMatDiag, PMatBlockDiag or torch.linalg.eigh(M.to_torch())"


class DroppedGenerator:
    """Stands in, after unpickling, for the generator of an object (the model and the
    function it was computed from, which are not pickled).

    It keeps what nngeometry's stand-in keeps (``layer_collection``, ``device``,
    ``get_device()``); any other use, i.e. an operation that needs a new pass over the
    data (EKFAC's ``update_diag``...), raises a ValueError saying so."""

    def __init__(self, owner: str, layer_collection: Optional[LayerCollection], device):
        self.owner = owner
        self.layer_collection = layer_collection
        self.device = device

    def get_device(self):
        return self.device

    def __getattr__(self, name: str):
        # only reached for attributes not set in __init__; dunder lookups (copy, pickle)
        # must see a plain AttributeError
        if name.startswith("__") or name in ("owner", "layer_collection", "device"):
            raise AttributeError(name)
        raise ValueError(
            f"this {self.owner} was unpickled, and its generator (the model and function it "
            f"was computed from) is not pickled, so '{name}', which needs a new pass over the "
            f"data, cannot run: compute the object again (FIM(model, loader, ...))"
        )

    def __repr__(self) -> str:
        return f"DroppedGenerator(of a {self.owner})"


def picklable_state(obj) -> dict:
    """``obj.__dict__`` for pickling: its ``generator`` replaced by a
    :class:`DroppedGenerator`. Refused, with a TypeError naming what to do instead, for
    an object sharded over a process group (``group``: it holds only this rank's part) and
    for an implicit object (``loader``: it holds no numbers, only the model and data)."""
    name = type(obj).__name__
    state = dict(obj.__dict__)
    if "loader" in state:
        raise TypeError(
            f"a {name} holds no numbers, only the model and the data loader it passes over at "
            "each operation, so it cannot be pickled: pickle a stored representation "
            "(PMatDense, PMatLowRank, PushForwardDense...) or the model and data"
        )
    if state.get("group") is not None:
        raise TypeError(
            f"this {name} holds only this rank's part of an object sharded over a process "
            "group, so it cannot be pickled alone: pickle obj.gather() (collective), or save "
            "it with obj.save(path) from every rank"
        )
    gen = state.get("generator")
    if gen is not None:
        lc = getattr(obj, "layer_collection", None)
        if lc is None:  # FMatDense has none of its own
            lc = getattr(gen, "layer_collection", None)
        state["generator"] = DroppedGenerator(name, lc, getattr(gen, "device", None))
    return state


def regularised_cholesky(M: Tensor, regul: float) -> Tensor:
    """L (d, d) lower triangular with L L^T = M + regul I, for a symmetric PSD M (d, d)."""
    A = M + regul * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise ValueError(
            f"M + {regul} I is not positive definite (singular matrix): increase regul"
        )
    return L


def cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """(L L^T)^{-1} b for a Cholesky factor L (d, d); b (d,) or (d, k). Two triangular
    solves: torch.cholesky_solve copies the d x d factor into LAPACK's layout at every
    call (7x slower for one right-hand side, d = 6000)."""
    rhs = b.unsqueeze(-1) if b.dim() == 1 else b
    y = torch.linalg.solve_triangular(L, rhs, upper=False)
    x = torch.linalg.solve_triangular(L.mT, y, upper=True)
    return x.squeeze(-1) if b.dim() == 1 else x


def regularised_solve(M: Tensor, b: Tensor, regul: float) -> Tensor:
    """(M + regul I)^{-1} b for a symmetric PSD M, by Cholesky; b (m,) or (m, k)."""
    return cholesky_solve(regularised_cholesky(M, regul), b)


def regularised_inverse(M: Tensor, regul: float) -> Tensor:
    """(M + regul I)^{-1} (d, d) for a symmetric PSD M: the factor's own inverse (potri,
    d^3 FLOPs with the factorisation) rather than d triangular solves against the
    identity (7/3 d^3)."""
    return torch.cholesky_inverse(regularised_cholesky(M, regul))
