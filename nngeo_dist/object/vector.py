"""Vectors of parameter space (PVector) and of function space (FVector).

A PVector holds one coefficient per parameter of its LayerCollection, either as one flat
tensor (d,) in the flat order of DESIGN.md §1, or per layer as a dict
``layer name -> (weight,)`` or ``(weight, bias)`` with the parameters' shapes.
Either form is produced on demand from the other.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..layercollection import LayerCollection
from .sums import l2_norm


class PVector:
    """A vector of parameter space, w = {W_1, b_1, ..., W_l, b_l}."""

    def __init__(
        self,
        layer_collection: LayerCollection,
        vector_repr: Optional[Tensor] = None,
        dict_repr: Optional[dict] = None,
    ):
        if (vector_repr is None) == (dict_repr is None):
            raise ValueError("give exactly one of vector_repr (flat) or dict_repr (per layer)")
        self.layer_collection = layer_collection
        if vector_repr is not None and vector_repr.shape != (layer_collection.numel(),):
            raise ValueError(
                f"vector_repr has shape {tuple(vector_repr.shape)}, the collection has "
                f"d={layer_collection.numel()} parameters"
            )
        # the form the vector was born in is kept as given (vector_repr / dict_repr report
        # it, as nngeometry's attributes do); the other form is derived on demand
        self._flat = vector_repr
        self._dict = None if dict_repr is None else OrderedDict((k, tuple(v)) for k, v in dict_repr.items())
        self._dict_view = None  # per-layer views of a flat-born vector, made once

    # construction from a model -------------------------------------------------------
    @staticmethod
    def from_model(model: nn.Module, layer_collection: Optional[LayerCollection] = None) -> "PVector":
        """The model's parameters themselves, as nngeometry's: no copy, so the vector follows
        the model and gradients flow through it (an EWC penalty ``F.vTMv(PVector.from_model(
        model) - w_a)`` back-propagates into the model). Take ``.clone().detach()`` for a
        snapshot such as ``w_a``."""
        return PVector._from_tensors(model, layer_collection, lambda p: p)

    @staticmethod
    def from_model_grad(model: nn.Module, layer_collection: Optional[LayerCollection] = None) -> "PVector":
        """The gradients held in ``.grad`` after a backward pass."""

        def grad(p):
            if p.grad is None:
                raise ValueError("a parameter has no .grad: run loss.backward() first")
            g = p.grad.detach()
            return g.to_dense() if g.is_sparse else g.clone()  # Embedding(sparse=True)

        return PVector._from_tensors(model, layer_collection, grad)

    @staticmethod
    def _from_tensors(model, layer_collection, get):
        lc = layer_collection or LayerCollection.from_model(model)
        l_to_m, _ = lc.get_layerid_module_maps(model)
        d = OrderedDict()
        for name, layer in lc.layers.items():
            mod = l_to_m[name]
            d[name] = (get(mod.weight), get(mod.bias)) if layer.has_bias else (get(mod.weight),)
        return PVector(lc, dict_repr=d)

    def copy_to_model(self, model: nn.Module) -> None:
        """Write this vector into the model's parameters."""
        self._write_to_model(model, lambda p, v: p.copy_(v))

    def add_to_model(self, model: nn.Module) -> None:
        """Add this vector to the model's parameters (a step w <- w + v)."""
        self._write_to_model(model, lambda p, v: p.add_(v))

    def _write_to_model(self, model, op):
        l_to_m, _ = self.layer_collection.get_layerid_module_maps(model)
        with torch.no_grad():
            for name, tensors in self.get_dict_representation().items():
                mod = l_to_m[name]
                op(mod.weight, tensors[0])
                if len(tensors) > 1:
                    op(mod.bias, tensors[1])

    # representations -----------------------------------------------------------------
    @property
    def vector_repr(self) -> Optional[Tensor]:
        """The flat tensor (d,) this vector was built from, or None for a vector built per
        layer (as nngeometry's attribute); :meth:`to_torch` gives (d,) whatever the form."""
        return self._flat

    @property
    def dict_repr(self) -> "Optional[OrderedDict[str, tuple]]":
        """The per-layer dict this vector was built from (layer name -> (weight,) or
        (weight, bias)), or None for a vector built flat (as nngeometry's attribute);
        :meth:`to_dict` gives the dict whatever the form."""
        return self._dict

    def get_flat_representation(self) -> Tensor:
        """(d,) in flat order. A vector born per layer concatenates afresh at each call
        (not cached): its tensors may be a model's live parameters, which change."""
        if self._flat is not None:
            return self._flat
        return torch.cat([t.reshape(-1) for ts in self._dict.values() for t in ts])

    def get_dict_representation(self) -> "OrderedDict[str, tuple]":
        """layer name -> (weight,) or (weight, bias), each with its parameter's shape;
        for a flat-born vector, views into its flat tensor."""
        if self._dict is not None:
            return self._dict
        if self._dict_view is None:
            self._dict_view = self.layer_collection.split_last_dim(self._flat)
        return self._dict_view

    to_torch = get_flat_representation
    to_dict = get_dict_representation

    def layer_flat(self, name: str) -> Tensor:
        """(d_l,) the coefficients of one layer, in flat order."""
        return torch.cat([t.reshape(-1) for t in self.get_dict_representation()[name]])

    @staticmethod
    def from_layer_flats(layer_collection: LayerCollection, flats: dict) -> "PVector":
        """Inverse of :meth:`layer_flat` over every layer of the collection."""
        return PVector(layer_collection, vector_repr=torch.cat([flats[n] for n in layer_collection.layers]))

    def size(self) -> torch.Size:
        return torch.Size([self.layer_collection.numel()])

    @property
    def dtype(self):
        return self.get_flat_representation().dtype

    @property
    def device(self):
        return self.get_flat_representation().device

    def clone(self) -> "PVector":
        return PVector(self.layer_collection, vector_repr=self.get_flat_representation().clone())

    def detach(self) -> "PVector":
        return PVector(self.layer_collection, vector_repr=self.get_flat_representation().detach())

    # algebra -------------------------------------------------------------------------
    def _check_same_space(self, other: "PVector") -> None:
        if not isinstance(other, PVector):
            raise TypeError(f"expected a PVector, got {type(other).__name__}")
        if other.layer_collection is not self.layer_collection and other.layer_collection != self.layer_collection:
            raise ValueError(
                "the two PVectors belong to different LayerCollections: build both from the "
                "same model and layer collection (e.g. PVector.from_model(model, F.layer_collection))"
            )

    def __add__(self, other: "PVector") -> "PVector":
        self._check_same_space(other)
        return PVector(self.layer_collection, vector_repr=self.to_torch() + other.to_torch())

    def __sub__(self, other: "PVector") -> "PVector":
        self._check_same_space(other)
        return PVector(self.layer_collection, vector_repr=self.to_torch() - other.to_torch())

    def __neg__(self) -> "PVector":
        return PVector(self.layer_collection, vector_repr=-self.to_torch())

    def __mul__(self, x: Union[float, Tensor]) -> "PVector":
        return PVector(self.layer_collection, vector_repr=x * self.to_torch())

    __rmul__ = __mul__

    def __truediv__(self, x) -> "PVector":
        return PVector(self.layer_collection, vector_repr=self.to_torch() / x)

    def __pow__(self, p) -> "PVector":
        return PVector(self.layer_collection, vector_repr=self.to_torch() ** p)

    def dot(self, other: "PVector") -> Tensor:
        self._check_same_space(other)
        return torch.dot(self.to_torch(), other.to_torch())

    def norm(self, p: float = 2) -> Tensor:
        return l2_norm(self.to_torch()) if p == 2 else torch.linalg.vector_norm(self.to_torch(), ord=p)

    def __repr__(self) -> str:
        return f"PVector(d={self.layer_collection.numel()})"


class FVector:
    """A vector of function space: one value per output and example, shape (c, n).

    As in nngeometry 0.4 it may also be given flat, (c n,) output-major (0.4's
    ``FMatDense.vTMv`` and ``PFMapDense.vjp`` read it so): it is kept as given, and the
    operations of an object that knows c (Gram ``mv`` / ``vTMv``, pull-backs) read it as
    (c, n)."""

    def __init__(self, vector_repr: Tensor):
        if vector_repr.dim() not in (1, 2):
            raise ValueError(f"an FVector is (c, n), or flat (c n,); got shape {tuple(vector_repr.shape)}")
        self._flat = vector_repr

    @property
    def vector_repr(self) -> Tensor:
        """The tensor this vector was built from (nngeometry 0.4's attribute)."""
        return self._flat

    def get_flat_representation(self) -> Tensor:
        """(c, n), or (c n,) for a vector given flat."""
        return self._flat

    to_torch = get_flat_representation

    def __add__(self, other: "FVector") -> "FVector":
        return FVector(self._flat + other.to_torch())

    def __sub__(self, other: "FVector") -> "FVector":
        return FVector(self._flat - other.to_torch())

    def __mul__(self, x) -> "FVector":
        return FVector(x * self._flat)

    __rmul__ = __mul__

    def dot(self, other: "FVector") -> Tensor:
        return (self._flat * other.to_torch()).sum()

    def norm(self, p: float = 2) -> Tensor:
        return l2_norm(self._flat) if p == 2 else torch.linalg.vector_norm(self._flat.reshape(-1), ord=p)

    def size(self) -> torch.Size:
        return self._flat.shape


def random_pvector(
    layer_collection: LayerCollection,
    device=None,
    dtype: torch.dtype = torch.float64,
    *,
    generator: Optional[torch.Generator] = None,
) -> PVector:
    """A PVector (d,) of independent standard normal coefficients, held flat.

    As nngeometry 0.4's (same positional order, float64 by default, the same draws for
    the same seed); ``generator``: draw from it instead of torch's global stream."""
    v = torch.normal(0.0, 1.0, (layer_collection.numel(),), device=device, dtype=dtype, generator=generator)
    return PVector(layer_collection, vector_repr=v)


def random_pvector_dict(
    layer_collection: LayerCollection,
    device=None,
    *,
    dtype: Optional[torch.dtype] = None,
    generator: Optional[torch.Generator] = None,
) -> PVector:
    """A PVector of independent standard normal coefficients, held per layer (layer name
    -> (weight,) or (weight, bias), the parameters' shapes).

    As nngeometry 0.4's: torch's default dtype unless ``dtype`` is given, drawn layer by
    layer in the collection's order, weight then bias (the same draws for the same seed)."""
    def draw(shape):
        return torch.normal(0.0, 1.0, tuple(shape), device=device, dtype=dtype, generator=generator)

    d = OrderedDict()
    for name, layer in layer_collection.layers.items():
        w = draw(layer.weight_shape)  # drawn before the bias: nngeometry's order
        d[name] = (w, draw(layer.bias_shape)) if layer.has_bias else (w,)
    return PVector(layer_collection, dict_repr=d)


def random_fvector(
    n_samples: int,
    n_output: int = 1,
    device=None,
    *,
    dtype: Optional[torch.dtype] = None,
    generator: Optional[torch.Generator] = None,
) -> FVector:
    """An FVector of shape (n_output, n_samples) = (c, n) of independent standard normal
    values: nngeometry 0.4's layout, which is already this library's (c, n), so the
    result is the same tensor (torch's default dtype unless ``dtype`` is given)."""
    v = torch.normal(0.0, 1.0, (n_output, n_samples), device=device, dtype=dtype, generator=generator)
    return FVector(v)
