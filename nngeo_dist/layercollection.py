"""Which parameters, grouped by layer, and where each sits in a flat parameter vector.

Flat order (DESIGN.md §1): layers in the order of ``model.named_modules()``, each layer's
weight (row-major) then its bias. A :class:`LayerCollection` may hold any subset of a
model's layers; every object built on it (vectors, matrices) lives in that subspace.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from .generator.layers import LAYER_TYPES, UnsupportedLayerError, layer_math_for


@dataclass(frozen=True)
class ParameterShape:
    """The shape of one parameter of a layer, as nngeometry 0.4's ``Parameter``:
    ``size`` the shape tuple, ``numel()`` its number of coefficients."""

    size: tuple

    def numel(self) -> int:
        return _prod(self.size)


@dataclass(frozen=True)
class Layer:
    """A parametrised module as the library sees it: its kind and parameter shapes.

    ``kind``: the layer type name (e.g. ``"Linear"``); ``weight_shape`` and ``bias_shape``
    (None when the module has no bias) give the shapes of the parameters. ``weight`` and
    ``bias`` (None without a bias) give them as nngeometry 0.4's layers do
    (``layer.weight.size``, ``layer.bias.numel()``).
    """

    kind: str
    weight_shape: tuple
    bias_shape: Optional[tuple]

    @property
    def weight(self) -> ParameterShape:
        return ParameterShape(tuple(self.weight_shape))

    @property
    def bias(self) -> Optional[ParameterShape]:
        return None if self.bias_shape is None else ParameterShape(tuple(self.bias_shape))

    @property
    def weight_numel(self) -> int:
        return _prod(self.weight_shape)

    @property
    def bias_numel(self) -> int:
        return 0 if self.bias_shape is None else _prod(self.bias_shape)

    @property
    def has_bias(self) -> bool:
        return self.bias_shape is not None

    def numel(self) -> int:
        return self.weight_numel + self.bias_numel

    @property
    def math(self):
        """The per-layer kernels of this layer type (see generator/layers.py)."""
        return layer_math_for(self.kind)


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


class LayerCollection:
    """An ordered set of layers, keyed by their module name in the model.

    ``layers``: OrderedDict name -> :class:`Layer`; ``p_pos``: name -> offset of the
    layer's first coefficient in the flat vector. ``numel()`` is the dimension d.
    """

    def __init__(self, layers: Optional[dict] = None):
        self.layers: "OrderedDict[str, Layer]" = OrderedDict()
        self.p_pos: "OrderedDict[str, int]" = OrderedDict()
        self._numel = 0
        for name, layer in (layers or {}).items():
            self.add_layer(name, layer)

    # construction ------------------------------------------------------------------
    @staticmethod
    def from_model(model: nn.Module, ignore_unsupported_layers: bool = False) -> "LayerCollection":
        """Every parametrised module of ``model`` that the library supports.

        A module holding parameters of its own that is not supported (its type, or its
        configuration: a grouped convolution, an Embedding with max_norm) raises
        :class:`UnsupportedLayerError` naming it, unless ``ignore_unsupported_layers``.
        A module whose parameters all belong to an earlier layer (tied weights) is not
        added again: each parameter appears once in the flat vector. Per-layer
        representations then refuse the model (they would miss the second use);
        PMatImplicit differentiates through every use.
        """
        lc = LayerCollection()
        seen: dict[int, str] = {}
        for name, mod in model.named_modules():
            own = [p for p in mod.parameters(recurse=False)]
            if not own:
                continue
            if all(id(p) in seen for p in own):
                # a module whose parameters all belong to an earlier layer (tied weights):
                # the parameters are counted once, under their first owner
                continue
            kind = type(mod).__name__
            if kind not in LAYER_TYPES:
                if ignore_unsupported_layers:
                    continue
                raise UnsupportedLayerError(
                    f"module '{name}' of type {kind} holds parameters but is not a "
                    f"supported layer type ({', '.join(sorted(LAYER_TYPES))}); pass "
                    "ignore_unsupported_layers=True to leave its parameters out, or build "
                    "a LayerCollection of the layers you need"
                )
            if ignore_unsupported_layers:
                try:
                    layer_math_for(kind).check_module(mod, name)
                except UnsupportedLayerError:
                    continue
            for p in own:
                if id(p) in seen:
                    raise ValueError(
                        f"module '{name}' shares a parameter with module '{seen[id(p)]}' (tied "
                        "weights) but also has parameters of its own, which a flat parameter "
                        "vector cannot hold once each; use PMatImplicit on a LayerCollection "
                        f"holding '{seen[id(p)]}' and not '{name}' (lc = LayerCollection(); "
                        "lc.add_layer_from_model(model, module) for each layer): it "
                        "differentiates through every use of the tied parameter"
                    )
                seen[id(p)] = name
            lc.add_layer_from_model(model, mod, name=name)
        return lc

    def add_layer(self, name: str, layer: Layer) -> None:
        if name in self.layers:
            raise ValueError(f"layer '{name}' is already in the collection")
        self.layers[name] = layer
        self.p_pos[name] = self._numel
        self._numel += layer.numel()

    def add_layer_from_model(self, model: nn.Module, module: nn.Module, name: Optional[str] = None) -> None:
        """Add ``module`` (a submodule of ``model``) to the collection."""
        if name is None:
            name = next((n for n, m in model.named_modules() if m is module), None)
            if name is None:
                raise ValueError("the module is not a submodule of the model")
        kind = type(module).__name__
        if kind not in LAYER_TYPES:
            raise UnsupportedLayerError(f"module '{name}' of type {kind} is not supported")
        layer_math_for(kind).check_module(module, name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise UnsupportedLayerError(
                f"module '{name}' ({kind}) has no weight (affine=False?): it has no "
                "parameters to put in a collection"
            )
        bias = getattr(module, "bias", None)
        self.add_layer(
            name,
            Layer(kind, tuple(weight.shape), None if bias is None else tuple(bias.shape)),
        )

    def sub_collection(self, names) -> "LayerCollection":
        """The collection restricted to ``names`` (kept in this collection's order)."""
        names = set(names)
        missing = names - set(self.layers)
        if missing:
            raise KeyError(f"layers not in the collection: {sorted(missing)}")
        return LayerCollection(OrderedDict((n, l) for n, l in self.layers.items() if n in names))

    # queries -------------------------------------------------------------------------
    def numel(self) -> int:
        return self._numel

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_id: str) -> Layer:
        return self.layers[layer_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerCollection) and list(self.layers.items()) == list(
            other.layers.items()
        )

    def __hash__(self):
        return hash(tuple(self.layers.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {l.kind}{l.weight_shape}" for n, l in self.layers.items())
        return f"LayerCollection({inner}; d={self._numel})"

    def get_layerid_module_maps(self, model: nn.Module):
        """(layer name -> module, module -> layer name) for ``model``."""
        mods = dict(model.named_modules())
        missing = [n for n in self.layers if n not in mods]
        if missing:
            raise ValueError(f"the model has no module named {missing}: wrong model for this collection?")
        l_to_m = OrderedDict((n, mods[n]) for n in self.layers)
        m_to_l = {m: n for n, m in l_to_m.items()}
        return l_to_m, m_to_l

    def parameters(self, model: "nn.Module | Mapping[str, nn.Module]") -> list[torch.Tensor]:
        """The model's parameters in flat order (weight then bias of each layer).
        ``model``: the model, or (nngeometry 0.4's form) the map layer name -> module of
        :meth:`get_layerid_module_maps`."""
        return [p for _, p in self.named_parameters(model)]

    def named_parameters(self, model: "nn.Module | Mapping[str, nn.Module]") -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) in flat order; ``model`` as in :meth:`parameters`."""
        l_to_m = model if isinstance(model, Mapping) else self.get_layerid_module_maps(model)[0]
        out = []
        for name, layer in self.layers.items():
            mod = l_to_m[name]
            out.append((f"{name}.weight" if name else "weight", mod.weight))
            if layer.has_bias:
                out.append((f"{name}.bias" if name else "bias", mod.bias))
        return out

    def split_last_dim(self, x: torch.Tensor) -> "OrderedDict[str, tuple]":
        """Per-layer views of ``x`` (..., d), d in flat order: layer name -> (weight,) or
        (weight, bias), each (..., *its parameter's shape)."""
        lead = tuple(x.shape[:-1])
        out = OrderedDict()
        for name, layer in self.layers.items():
            start = self.p_pos[name]
            w = x[..., start:start + layer.weight_numel].view(*lead, *layer.weight_shape)
            if layer.has_bias:
                b = x[..., start + layer.weight_numel:start + layer.numel()].view(*lead, *layer.bias_shape)
                out[name] = (w, b)
            else:
                out[name] = (w,)
        return out

    def shapes(self) -> list[tuple]:
        """Parameter shapes in flat order."""
        out = []
        for layer in self.layers.values():
            out.append(layer.weight_shape)
            if layer.has_bias:
                out.append(layer.bias_shape)
        return out
