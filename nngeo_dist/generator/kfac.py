"""Statistics of the Kronecker-factored and quasi-diagonal representations.

Each representation's additive sums over a shard of data are described by a
:class:`StatSpec`: the zero sums (right shapes, even if no batch ever comes), a function
of one captured batch returning what to add, and which sums are symmetric matrices. A spec
may cover only some layers of the generator's collection (a part of a mixed
representation); several specs merge, with prefixed names, into one spec, so that any
number of parts take ONE pass over the data and ONE reduction.

Names of the sums (per layer ``<l>`` of the collection):

- KFAC: ``A/<l>`` (i', i') — or (V,) for an Embedding, whose input factor is diagonal — and
  ``G/<l>`` (o, o): A = sum_n sum_t a a^T (a trailing 1 for a bias), G = sum_n sum_k
  (1/T) sum_t g g^T (DESIGN.md §1; divided by the example count when finalised).
- EKFAC: ``kfe/<l>`` (o, i'): sum_n sum_k of the squared per-example gradients in the
  Kronecker eigenbasis given by ``evecs[<l>] = (evecs_A or None, evecs_G)``.
- QuasiDiag: ``qdiag/<l>`` (numel,) and, for a layer with a bias, ``qcross/<l>``
  (numel_w,): sum_n sum_k d_w d_{b[owner(w)]}.

The maths of each layer type lives in :mod:`nngeo_dist.generator.layers`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from .statistics import Statistics


@dataclass
class StatSpec:
    """Zero sums, the per-batch increments ``per_batch(cap, ks) -> {name: tensor}``, and
    the names of the symmetric sums."""

    init: dict
    per_batch: Callable
    symmetric: frozenset = field(default_factory=frozenset)


def per_output_chunk(names, compute: Callable) -> Callable:
    """A ``per_batch`` for kernels that read a large input once for a whole chunk of
    outputs: it holds each layer's output gradients as the capturer delivers them (one
    output at a time when the backward loops; references, no stacked copy) and, once
    the chunk is complete (``Captured.chunk_end``), returns ``compute(cap, held)`` with
    ``held[name]`` a list of (K_j, N, *out); before that, no sums."""
    held = {n: [] for n in names}

    def per_batch(cap, ks):
        for n in names:
            held[n].append(cap.grads[n])
        if not cap.chunk_end:
            return {}
        chunk = {n: held[n] for n in names}
        held.update((n, []) for n in names)
        return compute(cap, chunk)

    return per_batch


def _selected(generator, names: Optional[Iterable[str]]):
    """(name, layer, module) of the generator's layers, restricted to ``names``."""
    if names is None:
        return list(generator._layers())
    names = set(names)
    missing = names - set(generator.layer_collection.layers)
    if missing:
        raise KeyError(f"layers not in the generator's collection: {sorted(missing)}")
    return [(n, l, m) for n, l, m in generator._layers() if n in names]


# ----------------------------------------------------------------------------- specs


def kfac_spec(generator, names: Optional[Iterable[str]] = None) -> StatSpec:
    """KFAC factor sums of the layers ``names`` (default: all). Raises, before any pass
    over data, for a layer KFAC cannot factor, naming it."""
    layers = _selected(generator, names)
    init, sym = {}, []
    for name, layer, mod in layers:
        math = layer.math
        o, i = math.kfac_dims(layer, name)
        if math.kfac_A_diagonal:
            init[f"A/{name}"] = generator._zeros(i)
        else:
            init[f"A/{name}"] = generator._zeros(i, i)
            sym.append(f"A/{name}")
        init[f"G/{name}"] = generator._zeros(o, o)
        sym.append(f"G/{name}")

    def per_batch(cap, ks):
        out = {}
        for name, layer, mod in layers:
            math = layer.math
            if ks.start == 0:  # inputs do not depend on the output chunk
                out[f"A/{name}"] = math.kfac_A(mod, cap.inputs[name])
            out[f"G/{name}"] = math.kfac_G(mod, cap.grads[name])
        return out

    return StatSpec(init, per_batch, frozenset(sym))


def kfe_diag_spec(generator, evecs: dict) -> StatSpec:
    """EKFAC diagonal sums in the eigenbasis ``evecs``: layer -> (evecs_A or None, evecs_G)."""
    layers = _selected(generator, evecs.keys())
    init = {}
    for name, layer, mod in layers:
        o, i = layer.math.kfac_dims(layer, name)
        init[f"kfe/{name}"] = generator._zeros(o, i)

    inputs = {}  # input-side projections, once per batch whatever the output chunking

    def compute(cap, held):
        return {f"kfe/{name}": layer.math.kfe_diag_held(mod, cap.inputs[name], held[name], *evecs[name], inputs[name])
                for name, layer, mod in layers}

    chunked = per_output_chunk([name for name, _, _ in layers], compute)

    def per_batch(cap, ks):
        if ks.start == 0:
            for name, layer, mod in layers:
                inputs[name] = layer.math.kfe_inputs(mod, cap.inputs[name], evecs[name][0])
        return chunked(cap, ks)

    return StatSpec(init, per_batch)


def quasidiag_spec(generator, names: Optional[Iterable[str]] = None) -> StatSpec:
    """Quasi-diagonal sums: diagonal, and weight/bias cross terms for layers with a bias."""
    layers = _selected(generator, names)
    init = {}
    for name, layer, mod in layers:
        init[f"qdiag/{name}"] = generator._zeros(layer.numel())
        if layer.has_bias:
            layer.math.quasidiag_owner(layer)  # raises now for a layout it does not know
            init[f"qcross/{name}"] = generator._zeros(layer.weight_numel)

    def compute(cap, held):
        out = {}
        for name, layer, mod in layers:
            d, c = layer.math.quasidiag_held(mod, cap.inputs[name], held[name], layer)
            out[f"qdiag/{name}"] = d
            if c is not None:
                out[f"qcross/{name}"] = c
        return out

    return StatSpec(init, per_output_chunk([name for name, _, _ in layers], compute))


# ----------------------------------------------------------------------------- merging


def merge_specs(specs: dict) -> StatSpec:
    """One spec from several: ``{prefix: spec}``, each sum renamed ``prefix + name``."""
    init, sym, parts = {}, set(), []
    for prefix, spec in specs.items():
        for k, v in spec.init.items():
            if prefix + k in init:
                raise ValueError(f"two parts produce the sum '{prefix + k}': use distinct prefixes")
            init[prefix + k] = v
        sym |= {prefix + k for k in spec.symmetric}
        parts.append((prefix, spec.per_batch))

    def per_batch(cap, ks):
        out = {}
        for prefix, fn in parts:
            for k, v in fn(cap, ks).items():
                out[prefix + k] = v
        return out

    return StatSpec(init, per_batch, frozenset(sym))


def run_spec(generator, loader, spec: StatSpec, desc: str = "statistics") -> Statistics:
    """One pass over ``loader``: the sums of ``spec`` and the example count."""
    init = {k: v.clone() for k, v in spec.init.items()}  # _accumulate adds in place
    return generator._accumulate(loader, desc, init, spec.per_batch, spec.symmetric)


def split_statistics(stats: Statistics, prefix: str) -> Statistics:
    """The sums named ``prefix + name``, renamed ``name`` (inverse of :func:`merge_specs`)."""
    n = len(prefix)
    return Statistics(
        {k[n:]: v for k, v in stats.sums.items() if k.startswith(prefix)},
        stats.count,
        frozenset(k[n:] for k in stats.symmetric if k.startswith(prefix)),
    )


# ----------------------------------------------------------------------------- passes


def kfac_statistics(generator, loader) -> Statistics:
    """KFAC factor sums ``A/<l>``, ``G/<l>`` of every layer, in one pass."""
    return run_spec(generator, loader, kfac_spec(generator), "kfac")


def kfe_diag_statistics(generator, loader, evecs: dict) -> Statistics:
    """EKFAC's diagonal sums ``kfe/<l>`` in the Kronecker eigenbasis ``evecs``."""
    return run_spec(generator, loader, kfe_diag_spec(generator, evecs), "ekfac diagonal")


def quasidiag_statistics(generator, loader) -> Statistics:
    """Quasi-diagonal sums ``qdiag/<l>``, ``qcross/<l>`` of every layer, in one pass."""
    return run_spec(generator, loader, quasidiag_spec(generator), "quasidiag")


__all__ = [
    "StatSpec", "kfac_spec", "kfe_diag_spec", "quasidiag_spec", "merge_specs", "per_output_chunk", "run_spec",
    "split_statistics", "kfac_statistics", "kfe_diag_statistics", "quasidiag_statistics",
]
