"""PMatMixed: one representation per layer, e.g. KFAC for Linear/Conv and BlockDiag for
normalisation layers.

``mapping``: layer name or layer type name (``"Linear"``, ``"BatchNorm2d"``, ...) ->
representation class, with an optional ``"default"`` key; a layer's own name wins over its
type, its type over the default. The layers mapped to one class form a *part*, a
representation of that class on the sub-collection of those layers (zero between parts;
within a part, what the class keeps — a PMatDense part is dense across its layers).

Building takes ONE pass over the data and ONE reduction for every part whose statistics
are known (all representations of the library except PMatLowRank and PMatImplicit, which
are built on their own): each part's sums are computed from the same captured batches and
merged under a prefix, reduced together, then split and finalised part by part.
Every operation is the sum (trace, vTMv, squared Frobenius norm) or the concatenation
(mv, solve, get_diag, to_torch's diagonal blocks) of the parts'.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Optional

import torch

from ...generator.kfac import StatSpec, merge_specs, run_spec, split_statistics
from ...generator.layers import LAYER_TYPES
from ...generator.statistics import Statistics
from ..vector import PVector
from .base import PMatAbstract, reduced_statistics


def _spec_for(cls, generator, layer_collection) -> Optional[StatSpec]:
    """The statistics spec of ``cls`` on a sub-collection, or None (built on its own)."""
    return cls.statistics_spec(generator, layer_collection) if cls.has_statistics() else None


def _accepted(fn, kw: dict) -> dict:
    """The keyword arguments of ``kw`` that ``fn`` accepts."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kw)
    return {k: v for k, v in kw.items() if k in params}


def _check_all_used(kw: dict, fns, what: str) -> None:
    used = set()
    for fn in fns:
        used |= set(_accepted(fn, kw))
    unused = set(kw) - used
    if unused:
        raise TypeError(f"{what}: no part accepts the argument(s) {sorted(unused)}")


def _prefix(i: int, cls) -> str:
    return f"{i}.{cls.__name__}/"


class PMatMixed(PMatAbstract):
    """Parts: representations on disjoint sub-collections that cover the collection.
    Memory and exactness: those of each part.

    ``parts``: list of PMat*, each with its own ``layer_collection`` (a sub-collection of
    this one); ``part_of(layer_name)`` gives the part holding a layer.
    """

    def __init__(self, layer_collection, parts: list, generator=None, mapping: Optional[dict] = None):
        super().__init__(layer_collection, generator)
        self.parts = list(parts)
        self.mapping = mapping
        seen = []
        for p in self.parts:
            seen += list(p.layer_collection.layers)
            for n, l in p.layer_collection.layers.items():
                if layer_collection.layers.get(n) != l:
                    raise ValueError(f"layer '{n}' of a part is not in the collection")
        if sorted(seen) != sorted(layer_collection.layers) or len(seen) != len(set(seen)):
            raise ValueError("the parts must cover every layer of the collection exactly once")
        self._index = [self._flat_index(p.layer_collection) for p in self.parts]

    def _flat_index(self, sub) -> torch.Tensor:
        lc = self.layer_collection
        return torch.cat([
            torch.arange(lc.p_pos[n], lc.p_pos[n] + l.numel()) for n, l in sub.layers.items()
        ])

    # the mapping ----------------------------------------------------------------------------
    @staticmethod
    def resolve(layer_collection, mapping: dict) -> "OrderedDict":
        """OrderedDict class -> [layer names], in the collection's order of first use."""
        if not isinstance(mapping, dict) or not mapping:
            raise TypeError(
                "mapping must be a non-empty dict layer type or layer name -> representation "
                "class, e.g. {'Linear': PMatKFAC, 'default': PMatBlockDiag}"
            )
        for key, cls in mapping.items():
            if not (isinstance(cls, type) and issubclass(cls, PMatAbstract)) or issubclass(cls, PMatMixed):
                raise TypeError(
                    f"mapping['{key}'] = {cls!r}: expected a representation class such as "
                    "PMatKFAC or PMatBlockDiag"
                )
            if key != "default" and key not in layer_collection.layers and key not in LAYER_TYPES:
                raise ValueError(
                    f"mapping key '{key}' is neither a layer of the collection "
                    f"({', '.join(layer_collection.layers)}), a layer type "
                    f"({', '.join(sorted(LAYER_TYPES))}) nor 'default'"
                )
        groups: "OrderedDict" = OrderedDict()
        for name, layer in layer_collection.layers.items():
            cls = mapping.get(name) or mapping.get(layer.kind) or mapping.get("default")
            if cls is None:
                raise ValueError(
                    f"layer '{name}' ({layer.kind}) matches no key of the mapping and it has no "
                    "'default': add one, e.g. 'default': PMatBlockDiag"
                )
            groups.setdefault(cls, []).append(name)
        return groups

    @staticmethod
    def _parts_of(layer_collection, mapping):
        return [(cls, layer_collection.sub_collection(names)) for cls, names in PMatMixed.resolve(layer_collection, mapping).items()]

    # building -------------------------------------------------------------------------------
    @classmethod
    def statistics_spec(cls, generator, layer_collection, mapping) -> StatSpec:
        specs = {}
        for i, (pcls, sub) in enumerate(cls._parts_of(layer_collection, mapping)):
            spec = _spec_for(pcls, generator, sub)
            if spec is None:
                raise NotImplementedError(
                    f"{pcls.__name__} has no additive statistics: a mixed matrix holding it can "
                    "only be built with PMatMixed.build (or FIM), not from statistics"
                )
            specs[_prefix(i, pcls)] = spec
        return merge_specs(specs)

    @classmethod
    def statistics(cls, generator, loader, mapping=None) -> Statistics:
        """Every part's sums, prefixed, from one pass over ``loader``."""
        return run_spec(generator, loader, cls.statistics_spec(generator, generator.layer_collection, mapping), "mixed")

    @classmethod
    def from_statistics(cls, layer_collection, stats, generator=None, mapping=None, **kw):
        parts_of = cls._parts_of(layer_collection, mapping)
        _check_all_used(kw, [p.from_statistics for p, _ in parts_of], "PMatMixed.from_statistics")
        parts = []
        for i, (pcls, sub) in enumerate(parts_of):
            sub_stats = split_statistics(stats, _prefix(i, pcls))
            parts.append(pcls.from_statistics(sub, sub_stats, generator=generator, **_accepted(pcls.from_statistics, kw)))
        return cls(layer_collection, parts, generator, mapping)

    @classmethod
    def build(cls, generator, loader, group=None, mapping=None, update_diag: bool = False, **kw):
        """Parts with additive statistics: one pass, one reduction, then finalised each;
        the others (PMatLowRank, PMatImplicit) built on their own sub-collection."""
        lc = generator.layer_collection
        parts_of = cls._parts_of(lc, mapping)
        specs = {}
        for i, (pcls, sub) in enumerate(parts_of):
            spec = _spec_for(pcls, generator, sub)
            if spec is not None:
                specs[_prefix(i, pcls)] = spec
        _check_all_used(
            kw,
            [p.from_statistics if _prefix(i, p) in specs else p.build for i, (p, _) in enumerate(parts_of)],
            "FIM/PMatMixed.build",
        )
        stats = None
        if specs:
            stats = reduced_statistics(lambda: run_spec(generator, loader, merge_specs(specs), "mixed"), group)
        parts = []
        for i, (pcls, sub) in enumerate(parts_of):
            prefix = _prefix(i, pcls)
            if prefix in specs:
                part = pcls.from_statistics(sub, split_statistics(stats, prefix), generator=generator,
                                            **_accepted(pcls.from_statistics, kw))
            else:
                part = pcls.build(generator.restricted_to(sub), loader, group=group,
                                  **_accepted(pcls.build, kw))
            parts.append(part)
        out = cls(lc, parts, generator, mapping)
        if update_diag:
            out.update_diag(loader, group=group)
        return out

    def update_diag(self, loader, group=None) -> None:
        """Re-fit the diagonal of every EKFAC part: one pass, one reduction."""
        specs = {f"{i}/": p.diag_spec(self.generator) for i, p in enumerate(self.parts) if hasattr(p, "diag_spec")}
        if not specs:
            raise ValueError("no part of this mixed matrix has a diagonal to update (no PMatEKFAC part)")
        if self.generator is None:
            raise ValueError("this PMatMixed has no generator: build it with FIM(...)")
        stats = reduced_statistics(
            lambda: run_spec(self.generator, loader, merge_specs(specs), "ekfac diagonal"), group)
        for i, p in enumerate(self.parts):
            if f"{i}/" in specs:
                p.set_diag_from_statistics(split_statistics(stats, f"{i}/"))

    # parts ----------------------------------------------------------------------------------
    def part_of(self, layer_name: str):
        for p in self.parts:
            if layer_name in p.layer_collection.layers:
                return p
        raise KeyError(f"no layer '{layer_name}' in this matrix")

    def _sub_vectors(self, v):
        self._check_vector(v)
        flat = v.to_torch()
        return [PVector(p.layer_collection, vector_repr=flat[idx.to(flat.device)]) for p, idx in zip(self.parts, self._index)]

    def _assemble(self, flats, like):
        out = torch.zeros(self.layer_collection.numel(), dtype=like.dtype, device=like.device)
        for f, idx in zip(flats, self._index):
            out[idx.to(out.device)] = f
        return out

    # the interface ----------------------------------------------------------------------------
    def mv(self, v):
        subs = self._sub_vectors(v)
        return self._vector(self._assemble([p.mv(s).to_torch() for p, s in zip(self.parts, subs)], v.to_torch()))

    def vTMv(self, v):
        return sum(p.vTMv(s) for p, s in zip(self.parts, self._sub_vectors(v)))

    def trace(self):
        return sum(p.trace() for p in self.parts)

    def frobenius_norm(self):
        return torch.sqrt(sum(p.frobenius_norm() ** 2 for p in self.parts))

    def get_diag(self):
        diags = [p.get_diag() for p in self.parts]
        return self._assemble(diags, diags[0])

    def to_torch(self):
        blocks = [p.to_torch() for p in self.parts]
        d = self.layer_collection.numel()
        M = torch.zeros(d, d, dtype=blocks[0].dtype, device=blocks[0].device)
        for b, idx in zip(blocks, self._index):
            idx = idx.to(M.device)
            M[idx[:, None], idx[None, :]] = b
        return M

    def _call_parts(self, method: str, kw: dict, *args):
        fns = []
        for p in self.parts:
            fn = getattr(p, method, None)
            if fn is None:
                raise self._no(f"{method} (its {type(p).__name__} part has none)", "another representation for that part")
            fns.append(fn)
        _check_all_used(kw, fns, f"PMatMixed.{method}")
        return [fn(*args, **_accepted(fn, kw)) for fn in fns]

    def solve(self, v, regul: float = 1e-8, **kw):
        """(M + regul I)^{-1} v part by part; extra options (e.g. ``use_pi``) go to the
        parts that take them."""
        subs = self._sub_vectors(v)
        self._check_regul(regul, singular_ok=True)
        _check_all_used(kw, [p.solve for p in self.parts], "PMatMixed.solve")
        outs = [p.solve(s, regul=regul, **_accepted(p.solve, kw)) for p, s in zip(self.parts, subs)]
        return self._vector(self._assemble([o.to_torch() for o in outs], v.to_torch()))

    def inverse(self, regul: float = 1e-8, **kw):
        return PMatMixed(self.layer_collection, self._call_parts("inverse", dict(kw, regul=regul)), self.generator, self.mapping)

    def pow(self, p: float, regul: float = 1e-8, **kw):
        return PMatMixed(self.layer_collection, self._call_parts("pow", dict(kw, regul=regul), p), self.generator, self.mapping)

    def __pow__(self, p):
        return self.pow(p)

    def _check_same_parts(self, other) -> None:
        self._same_kind(other)
        if len(self.parts) != len(other.parts) or any(
            type(a) is not type(b) or a.layer_collection != b.layer_collection for a, b in zip(self.parts, other.parts)
        ):
            raise TypeError("the two mixed matrices have different parts: convert both with to_torch() first")

    def __add__(self, other):
        self._check_same_parts(other)
        return PMatMixed(self.layer_collection, [a + b for a, b in zip(self.parts, other.parts)], self.generator, self.mapping)

    def __sub__(self, other):
        self._check_same_parts(other)
        return PMatMixed(self.layer_collection, [a - b for a, b in zip(self.parts, other.parts)], self.generator, self.mapping)

    def __rmul__(self, x):
        return PMatMixed(self.layer_collection, [x * p for p in self.parts], self.generator, self.mapping)

    __mul__ = __rmul__


__all__ = ["PMatMixed"]
