"""Per-layer kernels: the one place each layer type's maths lives.

Conventions for every kernel:

- ``mod``: the torch module; ``a``: its input as captured in the forward pass, shape
  ``(N, *in)`` (token indices for Embedding); ``g``: gradients of ``K`` output functions
  w.r.t. the module's output, shape ``(K, N, *out)``.
- Per-example gradients are laid out flat as the layer's slice of the flat parameter
  vector: weight row-major, then bias. Shape ``(K, N, numel)``.
- Every kernel returns a *sum* over outputs ``k`` and examples ``n`` (statistics are
  additive; dividing by the example count happens when a representation is finalised).

Layers whose output is affine in their weight through "patches" (Linear on any number of
leading dimensions, Conv1d, Conv2d, Embedding) share :class:`AffineMath`: with input
patches ``P`` of shape ``(N, T, i)`` and output gradients ``G`` of shape ``(K, N, T, o)``,
the per-example weight gradient is ``sum_t G[k, n, t]^T P[n, t]`` (an ``(o, i)`` matrix).
Normalisation layers share :class:`ElementwiseAffineMath`: ``y = xhat * w + b``.
Any other layer only needs ``per_example_grads``; every statistic has a generic default.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .patch_lags import WEIGHT_GRAD, pad_list, patch_products

log = logging.getLogger("nngeo_dist.generator")

LAYER_TYPES: dict[str, type] = {}


def register(*kinds: str):
    def deco(cls):
        for k in kinds:
            LAYER_TYPES[k] = cls
        return cls

    return deco


@functools.lru_cache(maxsize=None)
def layer_math_for(kind: str) -> "LayerMath":
    """The (stateless, shared) kernels of layer type ``kind``."""
    try:
        return LAYER_TYPES[kind]()
    except KeyError:
        raise TypeError(f"no kernels for layer type {kind}") from None


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


_memo_scope = threading.local()


@contextlib.contextmanager
def input_memo():
    """A scope (one captured batch) within which helpers marked :func:`per_input` run once
    per layer and input tensor: the batch's output chunks each call the kernels on the
    same inputs, and unfolding or normalising them is worth doing once."""
    outer = getattr(_memo_scope, "memo", None)
    _memo_scope.memo = {}
    try:
        yield
    finally:
        _memo_scope.memo = outer


def per_input(fn):
    """Memoise ``fn(self, mod, a)``, a function of the module and its captured input only,
    within the current :func:`input_memo` scope (outside one: no memo)."""

    @functools.wraps(fn)
    def wrapper(self, mod, a):
        memo = getattr(_memo_scope, "memo", None)
        if memo is None:
            return fn(self, mod, a)
        key = (fn, id(mod), id(a))
        hit = memo.get(key)
        if hit is not None and hit[0] is a and hit[1] == a._version:
            return hit[2]
        value = fn(self, mod, a)
        memo[key] = (a, a._version, value)  # holding ``a`` keeps its id unique in the scope
        return value

    return wrapper


#: the route :func:`fastest` chose for each key (kernel, layer type and shapes)
_FASTEST: dict = {}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _octave(n: int) -> int:
    """A size class (powers of two): inputs of varying length share a timed choice."""
    return max(int(n), 1).bit_length()


#: at most this many timed rounds when choosing a route (its best time counts)
ROUTE_ROUNDS = 3
#: a route whose best time is under 1/ROUTE_CLEAR of every other's is chosen at once
ROUTE_CLEAR = 2.0


def fastest(key: tuple, routes: dict, device: torch.device):
    """The result of the fastest of equivalent ``routes`` ({name: () -> result}, the same
    numbers up to rounding), chosen on the first call for ``key`` (:func:`_time_routes`)
    and kept for the key; the chosen route runs once more, so that a route writing into a
    buffer leaves its own numbers there and every call for the key gives the same bits."""
    name = _FASTEST.get(key)
    if name is None:
        name = _FASTEST[key] = _time_routes(key, routes, device)
    return routes[name]()


def _time_routes(key: tuple, routes: dict, device: torch.device) -> str:
    """The name of the route with the best time: each route runs once untimed (a first
    call sets kernels and buffers up), then all are timed in interleaved rounds, so that
    they see the same phases of a shared machine, until one is clearly the fastest
    (:data:`ROUTE_CLEAR`) or after :data:`ROUTE_ROUNDS` rounds. One timing each would
    let a single slow run on a busy machine keep a route 1.6x slower for the whole job."""
    if len(routes) == 1:
        return next(iter(routes))
    for route in routes.values():
        route()
    best = dict.fromkeys(routes, float("inf"))
    for _ in range(ROUTE_ROUNDS):
        for n, route in routes.items():
            t0 = _clock(device)
            route()
            best[n] = min(best[n], _clock(device) - t0)
        first, second = sorted(best.values())[:2]
        if second > ROUTE_CLEAR * first:
            break
    name = min(best, key=best.get)
    log.debug("%s: route %s (%s)", key[0], name, ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in best.items()))
    return name


class UnsupportedLayerError(TypeError):
    """A module of a type, or in a configuration, that the per-layer kernels do not cover:
    ``LayerCollection.from_model(model, ignore_unsupported_layers=True)`` leaves it out
    (its parameters are then not in the collection; the other layers' numbers are exact)."""


def _unsupported(name: str, mod, what: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"module '{name}' ({type(mod).__name__}) {what}; pass "
        "ignore_unsupported_layers=True to LayerCollection.from_model to leave its "
        "parameters out, or build a LayerCollection without it"
    )


class KFACUnsupportedError(TypeError, NotImplementedError):
    """A layer whose Fisher block KFAC cannot factor (BatchNorm, LayerNorm, ...)."""


def _square_sum_rows(x: Tensor) -> Tensor:
    """(K, N, p) -> (p,): sum over k and n of squares."""
    return (x * x).sum(dim=(0, 1))


def row_products(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """(M, p) -> (M, M) = x x^T, symmetric: for large enough products, the top half rows
    against all rows, the bottom-right block recursively, the bottom-left half block the
    transpose of the top-right one (about half the multiplications of the plain product)."""
    M, p = x.shape
    if out is None:
        out = x.new_empty(M, M)
    if M < 128 or p < 64:
        return torch.mm(x, x.t(), out=out)
    h = M // 2
    torch.mm(x[:h], x.t(), out=out[:h])
    row_products(x[h:], out[h:, h:])
    out[h:, :h] = out[:h, h:].t()
    return out


#: examples per chunk of a per-output loop over patches: about this many bytes of patches,
#: which stay in cache while every output's gradients are multiplied with them
PATCH_CHUNK_BYTES = 2 << 20


def chunk_step(example_bytes: int) -> int:
    """Examples per chunk of about :data:`PATCH_CHUNK_BYTES`."""
    return max(1, PATCH_CHUNK_BYTES // max(1, example_bytes))


def example_chunks(x: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """(examples, x[examples]) over chunks of the leading dim of ``x`` of about
    :data:`PATCH_CHUNK_BYTES` each."""
    step = chunk_step(x[0].numel() * x.element_size())
    for s in range(0, x.shape[0], step):
        sl = slice(s, min(x.shape[0], s + step))
        yield sl, x[sl]


def _square_sums_by_example_chunks(pieces, qs: list, right: Optional[Tensor] = None,
                                   cross_rows: Optional[int] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Sums over outputs k and examples n of the squared products ``p[n] q_k[n] right``:
    ``pieces`` yields (examples, p) with p (n_s, i', T) the inputs' side of a chunk of
    examples (the first chunk the largest), ``qs`` one (N, T, o) per output, ``right``
    (o, o) or None. Returns (i', o) and, with ``cross_rows = i``, the sums of the products
    of rows ``:i`` with row ``i`` (a bias's), (i, o).

    The (n_s, i', o) products are made output by output into one buffer (no (K, N, i', o)
    temporary), while a chunk's ``p`` stays in cache for every output to read; squares
    are accumulated per example slot (one fused multiply-add per product) and summed
    over the slots once at the end, which halves the element-wise passes."""
    sq = cross = gw = None
    for sl, p in pieces:
        n = p.shape[0]
        if gw is None:
            o = qs[0].shape[-1]
            gw = p.new_empty(n, p.shape[1], o)
            sq = p.new_zeros(n, p.shape[1], o)
            cross = None if cross_rows is None else p.new_zeros(n, cross_rows, o)
        g = gw[:n]
        for q in qs:
            q = q[sl]
            torch.bmm(p, q if right is None else q @ right, out=g)
            if cross is not None:
                cross[:n].addcmul_(g[:, :cross_rows], g[:, cross_rows:])
            sq[:n].addcmul_(g, g)
    return sq.sum(dim=0), (None if cross is None else cross.sum(dim=0))


def _joined(chunks: list) -> Tensor:
    """(K, N, *out) from a list of (K_j, N, *out) output chunks."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _write(out: Tensor, part: Tensor, accumulate: bool) -> None:
    if accumulate:
        out.add_(part)
    else:
        out.copy_(part)


class LayerMath:
    """Kernels of one layer type. Subclasses give ``per_example_grads``; the rest derive."""

    def check_module(self, mod, name: str) -> None:
        """Raise a clear error for a configuration these kernels do not cover."""

    def check_capture(self, mod, name: str) -> None:
        """Raise for a module state in which per-example gradients are undefined."""

    def per_example_grads(self, mod, a: Tensor, g: Tensor) -> Tensor:
        """(K, N, numel) per-example gradients of the K functions."""
        raise NotImplementedError

    def per_example_grads_into(self, mod, a: Tensor, g: Tensor, out: Tensor) -> None:
        """Write :meth:`per_example_grads` into ``out`` (K, N, numel), a view of a larger
        buffer: a Jacobian of n c d numbers is written once, not assembled by copies."""
        out.copy_(self.per_example_grads(mod, a, g))

    # statistics derived from per-example gradients ---------------------------------------
    # Diag, QuasiDiag and EKFAC's diagonal take the output gradients of a chunk of outputs
    # held as they came (``chunks``: (K_j, N, *out) each, not stacked), so that a kernel
    # reading a large input per output reads it once for all of them: subclasses override
    # the ``*_held`` kernels; the forms taking one (K, N, *out) tensor call them.
    def diag(self, mod, a, g) -> Tensor:
        """(numel,) sum over k, n of squared per-example gradients."""
        return self.diag_held(mod, a, [g])

    def diag_held(self, mod, a, chunks: list) -> Tensor:
        return sum(_square_sum_rows(self.per_example_grads(mod, a, g)) for g in chunks)

    def block(self, mod, a, g) -> Tensor:
        """(numel, numel) sum over k, n of outer products of per-example gradients."""
        pg = self.per_example_grads(mod, a, g).flatten(0, 1)
        return pg.t() @ pg

    def trace(self, mod, a, g) -> Tensor:
        return self.diag(mod, a, g).sum()

    # quasi-diagonal (Ollivier 2015) -----------------------------------------------------
    def quasidiag_owner(self, layer) -> Tensor:
        """(numel_w,) for each weight coefficient (flat order), the bias coefficient it
        interacts with in the quasi-diagonal representation. Default: the weight's leading
        dimensions are the bias's (Linear, Conv: one row per output unit; normalisation
        layers: one weight per bias)."""
        b, nw = layer.bias_numel, layer.weight_numel
        if b == 0 or nw % b or tuple(layer.weight_shape[:len(layer.bias_shape)]) != tuple(layer.bias_shape):
            raise TypeError(
                f"the quasi-diagonal representation does not know how the weight of a "
                f"{layer.kind} layer {tuple(layer.weight_shape)} maps onto its bias "
                f"{layer.bias_shape}: use PMatDiag or PMatBlockDiag for it"
            )
        return torch.arange(b).repeat_interleave(nw // b)

    def quasidiag(self, mod, a, g, layer) -> tuple[Tensor, Optional[Tensor]]:
        """Diagonal (numel,) and, for a layer with a bias, the cross terms (numel_w,) in the
        weight's flat order: sum over k, n of d_{w} * d_{b[owner(w)]} (None without bias)."""
        return self.quasidiag_held(mod, a, [g], layer)

    def quasidiag_held(self, mod, a, chunks: list, layer) -> tuple[Tensor, Optional[Tensor]]:
        if not layer.has_bias:
            return self.diag_held(mod, a, chunks), None
        nw = layer.weight_numel
        owner = self.quasidiag_owner(layer).to(chunks[0].device)
        d = cross = 0
        for g in chunks:
            pg = self.per_example_grads(mod, a, g)
            d = d + _square_sum_rows(pg)
            cross = cross + (pg[..., :nw] * pg[..., nw:][..., owner]).sum(dim=(0, 1))
        return d, cross

    # KFAC (DESIGN.md §1): only layers whose block factors as A (x) G override these ----
    kfac_A_diagonal = False  # the input factor is stored as its diagonal (Embedding)

    def _no_kfac(self, what: str) -> "KFACUnsupportedError":
        return KFACUnsupportedError(
            f"KFAC cannot factor {what}: its Fisher block is not a Kronecker product of an "
            "input and an output-gradient factor. Use one representation per layer, e.g. "
            "FIM(..., representation={\"Linear\": PMatKFAC, \"Conv2d\": PMatKFAC, "
            "\"default\": PMatBlockDiag})"
        )

    def kfac_dims(self, layer, name: str = "?") -> tuple[int, int]:
        """(o, i'): sizes of the G and A factors (i' counts a bias's trailing 1)."""
        raise self._no_kfac(f"layer '{name}' ({layer.kind})")

    def kfac_A(self, mod, a) -> Tensor:
        raise self._no_kfac(f"a {type(mod).__name__} layer")

    def kfac_G(self, mod, g) -> Tensor:
        raise self._no_kfac(f"a {type(mod).__name__} layer")

    def kfe_inputs(self, mod, a, evecs_a):
        raise self._no_kfac(f"a {type(mod).__name__} layer")

    def kfe_diag(self, mod, a, g, evecs_a, evecs_g, inputs=None) -> Tensor:
        """(o, i') sum over k, n of squared per-example gradients in the Kronecker
        eigenbasis ``evecs_g (x) evecs_a`` (``evecs_a`` None: the identity); ``inputs``:
        :meth:`kfe_inputs` if already computed for this batch."""
        return self.kfe_diag_held(mod, a, [g], evecs_a, evecs_g, inputs)

    def kfe_diag_held(self, mod, a, chunks: list, evecs_a, evecs_g, inputs=None) -> Tensor:
        raise self._no_kfac(f"a {type(mod).__name__} layer")

    # Gram (NTK) contributions -------------------------------------------------------------
    def gram_features(self, mod, a, g, n_total: Optional[int] = None) -> tuple:
        """What a Gram computation keeps of a batch for this layer: a tuple
        ``(kind, per_output (K, N, ...), per_example (N, ...) or None, bias)`` (the layout
        :mod:`~nngeo_dist.generator.gram` slices); by default the per-example
        gradients, ``("grads", (K, N, numel), None, False)``."""
        return ("grads", self.per_example_grads(mod, a, g), None, False)

    def gram_input_pair(self, f1: tuple, f2: tuple) -> Optional[Tensor]:
        """The part of :meth:`gram_pair_into` that depends on the examples only (not on
        the outputs), computed once for all the output tiles of two example sets; None
        when there is none."""
        return None

    def gram_pair_into(self, f1: tuple, f2: tuple, out: Tensor, accumulate: bool,
                       inputs: Optional[Tensor] = None) -> None:
        """Write (``accumulate``: add) into ``out`` (K1, N1, K2, N2) the layer's Gram
        contribution between two feature sets: the sum over its parameters of
        J_k(x_n) J_l(x_m) (``inputs``: :meth:`gram_input_pair` of the two)."""
        q1, q2 = f1[1], f2[1]
        K1, N1 = q1.shape[:2]
        K2, N2 = q2.shape[:2]
        prod = q1.reshape(K1 * N1, -1) @ q2.reshape(K2 * N2, -1).t()
        _write(out, prod.view(K1, N1, K2, N2), accumulate)

    def project_tangent(self, mod, weight_tangent: Tensor) -> Tensor:
        """The weight direction as autograd's backward sees it (forward-mode may differ)."""
        return weight_tangent


# --------------------------------------------------------------------------------------
# affine layers: Linear, Conv1d, Conv2d, Embedding
# --------------------------------------------------------------------------------------


class AffineMath(LayerMath):
    """Layers whose output at position t is ``W p_t (+ b)`` for input patches ``p_t``."""

    # flat weight layout: "oi" (row-major (out, in): Linear, Conv) or "io" (Embedding)
    weight_layout = "oi"
    # KFC normalises G by the number of positions T (Grosse & Martens 2016)
    def patches(self, mod, a: Tensor) -> Tensor:
        """(N, T, i) input patches."""
        raise NotImplementedError

    def positions(self, mod, g: Tensor) -> Tensor:
        """(K, N, T, o) output gradients, one row per position."""
        raise NotImplementedError

    def patches_with_ones(self, mod, a: Tensor) -> Tensor:
        """(N, T, i') patches with a trailing 1 for a bias (i' = i + 1), else the patches:
        the inputs of the layer's affine map, bias included."""
        p = self.patches(mod, a)
        if not self.has_bias(mod):
            return p
        return torch.cat([p, p.new_ones(p.shape[:-1] + (1,))], dim=-1)

    def has_bias(self, mod) -> bool:
        return getattr(mod, "bias", None) is not None

    def oi_to_flat(self, m: Tensor) -> Tensor:
        """(..., o, i) weight-shaped matrices -> (..., numel_w) in flat order."""
        if self.weight_layout == "io":
            m = m.transpose(-1, -2)
        return m.reshape(*m.shape[:-2], -1)

    def flat_to_oi(self, v: Tensor, o: int, i: int) -> Tensor:
        """Inverse of :meth:`oi_to_flat`."""
        if self.weight_layout == "io":
            return v.reshape(*v.shape[:-1], i, o).transpose(-1, -2)
        return v.reshape(*v.shape[:-1], o, i)

    def per_example_grads(self, mod, a, g):
        p, q = self.patches(mod, a), self.positions(mod, g)
        w = self.oi_to_flat(torch.einsum("knto,nti->knoi", q, p))
        if not self.has_bias(mod):
            return w
        return torch.cat([w, q.sum(dim=2)], dim=-1)

    def per_example_grads_into(self, mod, a, g, out):
        p, q = self.patches(mod, a), self.positions(mod, g)
        K, N, T, o = q.shape
        i = p.shape[-1]
        w = out[..., : o * i]
        if T == 1 and self.weight_layout == "oi":  # outer products, straight into place
            torch.mul(q[:, :, 0, :, None], p[None, :, 0, None, :], out=w.view(K, N, o, i))
        else:
            w.copy_(self.oi_to_flat(torch.einsum("knto,nti->knoi", q, p)))
        if self.has_bias(mod):
            out[..., o * i:].copy_(q.sum(dim=2))

    def _output_squares(self, mod, chunks: list) -> Tensor:
        """(N, o) sum over outputs k of the squared one-position output gradients, output
        by output from ``chunks`` ((K_j, N, o) each, as held): neither a (K, N, o) copy
        of the chunks nor a (K, N, o) temporary of their squares."""
        s = None
        for g in chunks:
            for qk in self.positions(mod, g)[:, :, 0]:  # (N, o) per output
                s = qk * qk if s is None else s.addcmul_(qk, qk)
        return s

    def _diag_one_position(self, mod, p: Tensor, s: Tensor) -> Tensor:
        """Diagonal from the patches ``p`` (N, i) and :meth:`_output_squares` ``s``."""
        w = self.oi_to_flat(s.t() @ (p * p))
        if not self.has_bias(mod):
            return w
        return torch.cat([w, s.sum(dim=0)])

    def diag_held(self, mod, a, chunks):
        p = self.patches(mod, a)
        if p.shape[1] != 1:  # several positions: squares of sums need the gradients
            return self._squares_by_patches(mod, a, chunks, cross=False)[0]
        return self._diag_one_position(mod, p[:, 0], self._output_squares(mod, chunks))

    def quasidiag_held(self, mod, a, chunks, layer):
        if self.weight_layout != "oi":
            return LayerMath.quasidiag_held(self, mod, a, chunks, layer)
        p = self.patches(mod, a)
        if p.shape[1] != 1:
            return self._squares_by_patches(mod, a, chunks, cross=layer.has_bias)
        s = self._output_squares(mod, chunks)
        d = self._diag_one_position(mod, p[:, 0], s)
        if not layer.has_bias:
            return d, None
        cross = s.t() @ p[:, 0]  # sum_kn g_o^2 p_i = d_{W[o,i]} d_{b[o]}
        return d, cross.reshape(-1)

    def patch_chunks(self, mod, a: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """(examples, (n_s, i', T) patches with a trailing 1 for a bias, transposed) over
        chunks of about :data:`PATCH_CHUNK_BYTES` of the batch's examples: the inputs'
        side of per-example products made chunk by chunk. A chunk may be overwritten by
        the next: use it before drawing another."""
        return example_chunks(self.patches_with_ones(mod, a).transpose(1, 2))

    def _squares_by_patches(self, mod, a, chunks: list, cross: bool):
        """Sums over k, n of the squared per-example gradients (flat: weight, then bias)
        and, with ``cross``, of the weight-bias products (o, i) flat, for a layer with
        several positions, from output gradients in ``chunks`` ((K_j, N, *out) each).

        From per-example gradients (N, i', o), the bias's as the last row (the faster
        orientation when fan-in is small)."""
        i = mod.weight.numel() // mod.weight.shape[0]
        qs = [qk for g in chunks for qk in self.positions(mod, g)]  # (N, T, o) per output
        d, wb = _square_sums_by_example_chunks(self.patch_chunks(mod, a), qs, cross_rows=i if cross else None)
        diag = torch.cat([d[:i].t().reshape(-1), d[i:].reshape(-1)])
        return diag, (wb.t().reshape(-1) if cross else None)

    # KFAC factors (sums; DESIGN.md §1) ----------------------------------------------------
    def kfac_dims(self, layer, name: str = "?") -> tuple[int, int]:
        ws = layer.weight_shape
        if self.weight_layout == "io":
            i, o = ws[0], _prod(ws[1:])
        else:
            o, i = ws[0], _prod(ws[1:])
        return o, i + (1 if layer.has_bias else 0)

    def kfac_to_mat(self, layer, x: Tensor) -> Tensor:
        """(..., numel) layer coefficients in flat order -> (..., o, i') matrices, the bias
        as the last column (the layout in which the KFAC block acts as V -> G V A)."""
        o, i1 = self.kfac_dims(layer)
        nw = layer.weight_numel
        i = i1 - 1 if layer.has_bias else i1
        w = self.flat_to_oi(x[..., :nw], o, i)
        if not layer.has_bias:
            return w
        return torch.cat([w, x[..., nw:].unsqueeze(-1)], dim=-1)

    def kfac_from_mat(self, layer, m: Tensor) -> Tensor:
        """Inverse of :meth:`kfac_to_mat`."""
        if not layer.has_bias:
            return self.oi_to_flat(m)
        return torch.cat([self.oi_to_flat(m[..., :-1]), m[..., -1]], dim=-1)

    def kfac_A(self, mod, a) -> Tensor:
        """(i', i') sum over examples and positions of p p^T, p with a trailing 1 for a bias
        (the bias row and column are the patches' sum and count)."""
        p = self.patches_with_ones(mod, a)
        p = p.reshape(-1, p.shape[-1])  # a view for convolutions' patches (patch_columns)
        return row_products(p.t())

    def kfac_G(self, mod, g) -> Tensor:
        """(o, o) sum over outputs and examples of (1/T) sum_t g_t g_t^T."""
        q = self.positions(mod, g)
        K, N, T, o = q.shape
        if T >= o:
            # many positions (convolutions): one (o, T) x (T, o) product per (k, n), read
            # in the layout the gradients come in; the (K N, o, o) temporary is smaller
            # than the gradients themselves
            q = q.reshape(K * N, T, o)
            return torch.bmm(q.transpose(1, 2), q).sum(dim=0) / T
        q = q.reshape(-1, o)
        return (q.t() @ q) / T

    def kfe_inputs(self, mod, a, evecs_a: Optional[Tensor]) -> Tensor:
        """The input side of :meth:`kfe_diag`, which does not depend on the outputs (so a
        caller chunking the outputs computes it once per batch): patches with a trailing 1
        projected on ``evecs_a`` (None: the identity), (N, i') for one position, else
        (N, i', T) (the layout a convolution's unfolded input comes in)."""
        p = self.patches_with_ones(mod, a)  # (N, T, i')
        if p.shape[1] == 1:
            p = p[:, 0]
            return p if evecs_a is None else p @ evecs_a
        pt = p.transpose(1, 2)  # (N, i', T)
        return pt if evecs_a is None else evecs_a.t() @ pt

    def kfe_diag_held(self, mod, a, chunks, evecs_a, evecs_g, inputs=None):
        pk = self.kfe_inputs(mod, a, evecs_a) if inputs is None else inputs
        if pk.dim() == 2:  # one position
            q = self.positions(mod, _joined(chunks))[:, :, 0]
            return ((q @ evecs_g) ** 2).sum(0).t() @ (pk * pk)
        # many positions: (i', T) x (T, o) products per example (the faster orientation
        # when fan-in is small)
        qs = [qk for g in chunks for qk in self.positions(mod, g)]
        return _square_sums_by_example_chunks(example_chunks(pk), qs, right=evecs_g)[0].t()

    # Gram: choose per layer between per-example gradients and the pairwise form --------
    def gram_inputs(self, mod, a) -> tuple[Tensor, int]:
        """What the pairwise Gram form keeps of a batch's inputs, and the cost of one
        inner product of two of them: the patches (N, T, i), and i."""
        p = self.patches(mod, a)
        return p, p.shape[-1]

    def input_products(self, x1, x2) -> Tensor:
        """(N1, T1, N2, T2) inner products of two batches' patches at every pair of
        positions (the bias's 1 not included), from :meth:`gram_inputs`."""
        return torch.einsum("nti,msi->ntms", x1, x2)

    def gram_features(self, mod, a, g, n_total=None):
        x, width = self.gram_inputs(mod, a)
        q = self.positions(mod, g)
        K, N, T, o = q.shape
        i = mod.weight.numel() // o
        n = n_total or N
        pairwise = (K * n) ** 2 * T * T * (o + 1) + n * n * T * T * width
        via_grads = 2 * K * n * T * o * i + (K * n) ** 2 * (o * i + o)
        if pairwise <= via_grads:
            if T == 1 and N > 1 and torch.equal(q, q[:, :1].expand_as(q)):
                q = q[:, :1].expand_as(q)  # see _shared_pair_into
            return ("pairwise", q, x, self.has_bias(mod))
        return super().gram_features(mod, a, g, n_total)

    def gram_input_pair(self, f1, f2):
        """Pairwise form: (N1, T1, N2, T2) products of the patches (+1 for a bias)."""
        if f1[0] == "grads":
            return None
        aa = self.input_products(f1[2], f2[2]).to(f1[1].dtype)
        return aa + 1.0 if f1[3] else aa

    def gram_pair_into(self, f1, f2, out, accumulate, inputs=None):
        """Pairwise form: sum over positions t, s of (g_t . g_s) (p_t . p_s + bias)."""
        if f1[0] == "grads":
            return super().gram_pair_into(f1, f2, out, accumulate)
        aa = self.gram_input_pair(f1, f2) if inputs is None else inputs
        q1, q2 = f1[1], f2[1]
        K1, N1, T1, o = q1.shape
        K2, N2, T2, _ = q2.shape
        if T1 == 1 and T2 == 1:
            if _same_for_every_example(q1) and _same_for_every_example(q2):
                return _shared_pair_into(q1[:, 0, 0], q2[:, 0, 0], aa[:, 0, :, 0], out, accumulate)
            gg = (q1.reshape(K1 * N1, o) @ q2.reshape(K2 * N2, o).t()).view(K1, N1, K2, N2)
            scale = aa[:, 0, :, 0][None, :, None, :]
            if accumulate:
                out.addcmul_(gg, scale)  # one pass: no scaled temporary
            else:
                torch.mul(gg, scale, out=out)
            return
        gg = torch.einsum("knto,lmso->kntlms", q1, q2)
        _write(out, torch.einsum("kntlms,ntms->knlm", gg, aa), accumulate)


def _same_for_every_example(q: Tensor) -> bool:
    """Whether per-output Gram features (K, N, ...) are one row per output, expanded over
    the examples (as :meth:`AffineMath.gram_features` leaves them when they are)."""
    return q.stride(1) == 0


def _shared_pair_into(c1: Tensor, c2: Tensor, scale: Tensor, out: Tensor, accumulate: bool) -> None:
    """out (K1, N1, K2, N2) (+)= C[k, l] scale[n, m], C = c1 c2^T: the Gram contribution of
    a one-position layer whose output gradients ``c1`` (K1, o), ``c2`` (K2, o) are the
    same for every example, ``scale`` (N1, N2) its inputs' products (+1 for a bias).

    This is the last linear layer of raw outputs (the gradient of output k is e_k): C is
    the identity, so only the K diagonal blocks (k, k) are written to, and no (K N)^2
    product of gradients is formed.
    """
    C = c1 @ c2.t()
    pairs = C.nonzero()
    if not accumulate:
        out.zero_()
    if pairs.shape[0] > max(C.shape):  # dense C: one broadcast pass
        out.addcmul_(C[:, None, :, None], scale[None, :, None, :])
        return
    for k, l in pairs.tolist():
        out[k, :, l, :].add_(scale * C[k, l])


@register("Linear")
class LinearMath(AffineMath):
    """``y = x W^T + b`` on inputs (N, *, i); every leading position is one patch."""

    def patches(self, mod, a):
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def positions(self, mod, g):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _conv_padding(mod, dims: int) -> list[tuple[int, int]]:
    """The module's padding as (before, after) per spatial dim, torch's 'same' (the odd
    one after) and 'valid' resolved."""
    ks, dil = mod.kernel_size, mod.dilation
    if mod.padding == "valid":
        return [(0, 0)] * dims
    if mod.padding == "same":
        return [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for k, dl in zip(ks, dil)]
    return [(p, p) for p in mod.padding[:dims]]


class ConvMath(AffineMath):
    dims = 2

    def check_module(self, mod, name):
        if mod.groups != 1:
            raise _unsupported(name, mod, f"has groups={mod.groups}; only groups=1 convolutions are supported")

    @per_input
    def padded(self, mod, a: Tensor) -> Tensor:
        """The input with the module's padding applied (``'same'`` resolved; zeros, or the
        module's ``padding_mode``, as its forward pads before an unpadded convolution)."""
        pads = _conv_padding(mod, self.dims)
        if not any(map(any, pads)):
            return a
        if mod.padding_mode == "zeros":
            return F.pad(a, pad_list(pads))
        return F.pad(a, pad_list(pads), mode=mod.padding_mode)

    def weight_grads_by_conv(self, mod, a: Tensor, gk: Tensor) -> Tensor:
        """(N, o, i) per-example weight gradients of one output function, gradients
        ``gk`` (N, o, *out), as the convolution's own weight gradient with the examples
        as groups: reads the input, not its patches (k^d times larger)."""
        x = self.padded(mod, a)
        N, C = x.shape[:2]
        o = gk.shape[1]
        weight_grad = WEIGHT_GRAD[self.dims]
        gw = weight_grad(x.reshape(1, N * C, *x.shape[2:]), (N * o, C, *mod.kernel_size),
                         gk.reshape(1, N * o, *gk.shape[2:]), stride=mod.stride, padding=0,
                         dilation=mod.dilation, groups=N)
        return gw.view(N, o, -1)

    # Per-example gradients come from the patches (batched products) or from the
    # convolution's weight gradient, whichever runs faster for the layer's shapes: the
    # first wins when the patches are narrow, the second when they are large.
    def _route_key(self, kernel: str, mod, a, g: Optional[Tensor]) -> tuple:
        return (kernel, type(mod).__name__, tuple(mod.weight.shape), mod.stride, str(mod.padding),
                mod.dilation, self.has_bias(mod), 0 if g is None else g.shape[0], _octave(a.shape[0]),
                _octave(a[0, 0].numel()), a.dtype, a.device)

    def per_example_grads(self, mod, a, g):
        out = g.new_empty(*g.shape[:2], mod.weight.numel() + (g.shape[2] if self.has_bias(mod) else 0))
        self.per_example_grads_into(mod, a, g, out)
        return out

    def per_example_grads_into(self, mod, a, g, out):
        fastest(self._route_key("per_example_grads", mod, a, g),
                {"patches": lambda: AffineMath.per_example_grads_into(self, mod, a, g, out),
                 "conv": lambda: self._grads_by_conv_into(mod, a, g, out)}, a.device)

    def _grads_by_conv_into(self, mod, a, g, out):
        nw, o = mod.weight.numel(), g.shape[2]
        w = out[..., :nw].unflatten(-1, (o, nw // o))  # (K, N, o, i)
        for wk, gk in zip(w, g):
            wk.copy_(self.weight_grads_by_conv(mod, a, gk))
        if self.has_bias(mod):
            out[..., nw:].copy_(self.positions(mod, g).sum(dim=2))

    def _squares_by_conv(self, mod, a, chunks: list, cross: bool):
        """Sums over k, n of the squared per-example gradients (weight (o, i), bias (o,))
        and, with ``cross``, of the weight-bias products (o, i), output by output, from
        output gradients in ``chunks`` ((K_j, N, *out) each)."""
        bias = self.has_bias(mod)
        g0 = chunks[0]
        o = g0.shape[2]
        d = g0.new_zeros(o, mod.weight.numel() // o)
        d_bias = g0.new_zeros(o) if bias else None
        wb = g0.new_zeros(d.shape) if cross else None
        per_output = [gk for g in chunks for gk in g]  # (N, o, *out) each
        # (N, o) bias gradients per output
        bias_grads = [gk.flatten(2).sum(dim=2) for gk in per_output] if bias else [None] * len(per_output)
        for gk, b in zip(per_output, bias_grads):
            gw = self.weight_grads_by_conv(mod, a, gk)  # (N, o, i)
            if bias:
                d_bias += (b * b).sum(dim=0)
                if cross:
                    wb += (gw * b[:, :, None]).sum(dim=0)
            d += gw.square_().sum(dim=0)
        diag = d.reshape(-1) if not bias else torch.cat([d.reshape(-1), d_bias])
        return diag, (wb.reshape(-1) if cross else None)

    def _squares(self, kernel: str, mod, a, chunks: list, cross: bool):
        """:meth:`_squares_by_patches` or :meth:`_squares_by_conv`, whichever is faster for
        the layer's shapes."""
        key = self._route_key(kernel, mod, a, chunks[0]) + (len(chunks),)
        return fastest(key, {"patches": lambda: self._squares_by_patches(mod, a, chunks, cross),
                             "conv": lambda: self._squares_by_conv(mod, a, chunks, cross)}, a.device)

    def diag_held(self, mod, a, chunks):
        return self._squares("diag", mod, a, chunks, cross=False)[0]

    def quasidiag_held(self, mod, a, chunks, layer):
        return self._squares("quasidiag", mod, a, chunks, cross=layer.has_bias)

    def kfac_A(self, mod, a):
        # with stride 1, the lags route reads the input instead of its patches and makes
        # about (2k-1)^d / k^2d of their product's multiplications (patch_lags.py)
        if any(s != 1 for s in mod.stride):
            return AffineMath.kfac_A(self, mod, a)
        return fastest(self._route_key("kfac_A", mod, a, None),
                       {"patches": lambda: AffineMath.kfac_A(self, mod, a),
                        "lags": lambda: self._kfac_A_by_lags(mod, a)}, a.device)

    def _kfac_A_by_lags(self, mod, a):
        if mod.padding_mode != "zeros":  # padded values are not zeros: lags of the padded input
            return patch_products(self.padded(mod, a), mod.kernel_size, mod.dilation,
                                  [(0, 0)] * self.dims, self.has_bias(mod))
        return patch_products(a, mod.kernel_size, mod.dilation, _conv_padding(mod, self.dims), self.has_bias(mod))

    def _out_size(self, mod, x: Tensor) -> list:
        """The output's spatial size for the padded input ``x`` (N, C, *spatial)."""
        ks, st, dil = mod.kernel_size, mod.stride, mod.dilation
        return [(x.shape[2 + d] - dil[d] * (ks[d] - 1) - 1) // st[d] + 1 for d in range(self.dims)]

    def _windows(self, mod, x: Tensor, size: list) -> Iterator[tuple[tuple, Tensor]]:
        """Per kernel offset: (offset, the (N, C, *size) view of the padded input ``x`` it
        reads at every output position). The patches are these views, one per offset."""
        for off in itertools.product(*(range(k) for k in mod.kernel_size)):
            window = tuple(slice(o * dl, o * dl + (n - 1) * s + 1, s)
                           for o, dl, n, s in zip(off, mod.dilation, size, mod.stride))
            yield off, x[(slice(None), slice(None), *window)]

    @per_input
    def patch_columns(self, mod, a: Tensor) -> Tensor:
        """(i', N, T) input patches, i = C * prod(kernel) in the weight's (C, *kernel)
        order, then a row of ones for a bias: one strided copy of the (padded) input per
        kernel offset. Faster than im2col, and in this layout the patches of a whole
        batch are one (i', N T) matrix."""
        a = self.padded(mod, a)
        N, C = a.shape[:2]
        size = self._out_size(mod, a)
        i, T, bias = C * _prod(mod.kernel_size), _prod(size), self.has_bias(mod)
        cols = a.new_empty((i + bias, N, T))
        taps = cols[:i].view(C, *mod.kernel_size, N, *size)
        for off, w in self._windows(mod, a, size):
            taps[(slice(None), *off)].copy_(w.transpose(0, 1))
        if bias:
            cols[i].fill_(1)
        return cols

    def patch_chunks(self, mod, a):
        # Each chunk is built from the input into one buffer, contiguous per example: the
        # batch's patches (k^d times the input) are never held, the buffer stays in
        # cache, and batched products read this layout faster than strided columns.
        x = self.padded(mod, a)
        N, C = x.shape[:2]
        size = self._out_size(mod, x)
        i, T, bias = C * _prod(mod.kernel_size), _prod(size), self.has_bias(mod)
        step = chunk_step((i + bias) * T * x.element_size())
        buf = x.new_empty((min(step, N), i + bias, T))
        if bias:
            buf[:, i].fill_(1)
        for s in range(0, N, step):
            sl = slice(s, min(N, s + step))
            p = buf[: sl.stop - s]
            taps = p[:, :i].view(p.shape[0], C, *mod.kernel_size, *size)
            for off, w in self._windows(mod, x[sl], size):
                taps[(slice(None), slice(None), *off)].copy_(w)
            yield sl, p

    # EKFAC's diagonal: the patches projected on A's eigenbasis chunk by chunk, like
    # Diag's, so that the batch's patches (k^d times its input) and their projection are
    # never held (they were, twice, through kfe_inputs)
    def kfe_inputs(self, mod, a, evecs_a):
        return None  # made per chunk of examples in kfe_diag_held

    def kfe_diag_held(self, mod, a, chunks, evecs_a, evecs_g, inputs=None):
        qs = [qk for g in chunks for qk in self.positions(mod, g)]  # (N, T, o) per output
        pieces = self._projected_patch_chunks(mod, a, evecs_a)
        return _square_sums_by_example_chunks(pieces, qs, right=evecs_g)[0].t()

    def _projected_patch_chunks(self, mod, a, evecs_a):
        """:meth:`patch_chunks` projected on ``evecs_a`` (i', i') (None: as they are), each
        chunk into one reused buffer: (examples, (n_s, i', T))."""
        buf = None
        for sl, p in self.patch_chunks(mod, a):
            if evecs_a is None:
                yield sl, p
                continue
            if buf is None:  # the first chunk is the largest
                buf = p.new_empty(p.shape)
            out = buf[: p.shape[0]]
            torch.matmul(evecs_a.t(), p, out=out)
            yield sl, out

    def patches(self, mod, a):
        cols = self.patch_columns(mod, a)
        return cols[: cols.shape[0] - self.has_bias(mod)].permute(1, 2, 0)

    def patches_with_ones(self, mod, a):
        return self.patch_columns(mod, a).permute(1, 2, 0)

    def positions(self, mod, g):
        K, N, o = g.shape[:3]
        return g.reshape(K, N, o, -1).transpose(2, 3)


@register("Conv2d")
class Conv2dMath(ConvMath):
    dims = 2


@register("Conv1d")
class Conv1dMath(ConvMath):
    dims = 1


@register("Embedding")
class EmbeddingMath(AffineMath):
    """Rows of W (V, D) are looked up: the patch of a token is its one-hot vector.

    The flat layout is W row-major, i.e. (vocabulary, dimension): "io" in affine terms.
    """

    weight_layout = "io"

    def check_module(self, mod, name):
        if mod.max_norm is not None:
            raise _unsupported(
                name, mod, "has max_norm set: it rewrites its weight during the forward "
                "pass, so gradients are not those of the stored weight"
            )
        if mod.scale_grad_by_freq:
            raise _unsupported(
                name, mod, "has scale_grad_by_freq=True: torch divides its gradient by each "
                "index's count in the whole batch, so an example's gradient depends on the "
                "other examples of its batch and no per-example quantity is defined (build "
                "the Fisher on a copy with scale_grad_by_freq=False)"
            )

    def has_bias(self, mod):
        return False

    def _onehot(self, mod, a):
        idx = a.reshape(a.shape[0], -1)
        p = F.one_hot(idx, mod.num_embeddings).to(mod.weight.dtype)
        if mod.padding_idx is not None:  # torch gives the padding row no gradient
            p[..., mod.padding_idx] = 0
        return p

    def patches(self, mod, a):
        return self._onehot(mod, a)

    def positions(self, mod, g):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])

    def project_tangent(self, mod, weight_tangent):
        # the backward gives the padding row no gradient; forward-mode would move it
        if mod.padding_idx is None:
            return weight_tangent
        t = weight_tangent.clone()
        t[mod.padding_idx] = 0
        return t

    kfac_A_diagonal = True

    def _tokens(self, mod, a) -> Tensor:
        """(N, T) token ids; the padding index (no gradient) mapped to -1."""
        idx = a.reshape(a.shape[0], -1)
        if mod.padding_idx is not None:
            idx = torch.where(idx == mod.padding_idx, torch.full_like(idx, -1), idx)
        return idx

    def kfac_A(self, mod, a):
        """The input factor is diagonal (one-hot patches): returned as its diagonal (V,),
        token counts (the padding row, which gets no gradient, counts 0)."""
        idx = self._tokens(mod, a).flatten()
        idx = idx[idx >= 0]
        return torch.bincount(idx, minlength=mod.num_embeddings).to(mod.weight.dtype)

    def kfe_inputs(self, mod, a, evecs_a):
        return None  # the tokens are read from ``a`` directly

    def kfe_diag_held(self, mod, a, chunks, evecs_a, evecs_g, inputs=None):
        """(D, V). The input factor is diagonal, so its eigenbasis is the identity
        (``evecs_a`` is None): the squared rows of :meth:`diag`, in G's eigenbasis."""
        return sum(self._squared_rows(mod, a, self.positions(mod, g) @ evecs_g) for g in chunks).t()

    # without one-hot patches: a batch touches few of the V rows -----------------------
    def _row_grads(self, mod, a, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per example, the gradient of row v is the sum of the output gradients ``q``
        (K, N, T, D) at the positions holding token v. Returns (n (U,), v (U,), rows
        (K, U, D)) over the U distinct (example, token) pairs of the batch (padding left
        out)."""
        V = mod.num_embeddings
        idx = self._tokens(mod, a)  # (N, T)
        K, N, T, D = q.shape
        keep = (idx >= 0).flatten()
        key = (torch.arange(N, device=idx.device)[:, None] * V + idx).flatten()[keep]
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = q.new_zeros(K, uniq.numel(), D)
        rows.index_add_(1, inv, q.reshape(K, N * T, D)[:, keep])
        return uniq // V, uniq % V, rows

    def _squared_rows(self, mod, a, q: Tensor) -> Tensor:
        """(V, D) sum over k, n of squared per-example gradients of the rows."""
        _, v, rows = self._row_grads(mod, a, q)
        out = q.new_zeros(mod.num_embeddings, q.shape[-1])
        return out.index_add_(0, v, (rows * rows).sum(0))

    def per_example_grads(self, mod, a, g):
        K, N = g.shape[:2]
        out = g.new_empty(K, N, mod.weight.numel())
        self.per_example_grads_into(mod, a, g, out)
        return out

    def per_example_grads_into(self, mod, a, g, out):
        n, v, rows = self._row_grads(mod, a, self.positions(mod, g))
        w = out.unflatten(-1, tuple(mod.weight.shape))  # (K, N, V, D)
        w.zero_()
        w[:, n, v] = rows  # the (n, v) pairs are distinct

    def diag_held(self, mod, a, chunks):
        return sum(self._squared_rows(mod, a, self.positions(mod, g)) for g in chunks).reshape(-1)

    def gram_inputs(self, mod, a):
        return self._tokens(mod, a), 1

    def input_products(self, t1, t2):
        """One-hot patches' products: whether the tokens match (padding matches nothing)."""
        return (t1[:, :, None, None] == t2[None, None]) & (t1 >= 0)[:, :, None, None]


# --------------------------------------------------------------------------------------
# ConvTranspose2d
# --------------------------------------------------------------------------------------


@register("ConvTranspose2d")
class ConvTranspose2dMath(LayerMath):
    """Weight (in, out, kh, kw). Output gradients unfolded with the layer's own
    stride/padding/dilation give one (out*kh*kw) column per input position, so the
    per-example gradient is ``sum_p a[:, p] unfold(g)[:, p]^T``."""

    def check_module(self, mod, name):
        ConvMath.check_module(self, mod, name)

    def per_example_grads(self, mod, a, g):
        K, N = g.shape[:2]
        cols = F.unfold(
            g.flatten(0, 1), kernel_size=mod.kernel_size, stride=mod.stride,
            padding=mod.padding, dilation=mod.dilation,
        ).view(K, N, -1, a.shape[2] * a.shape[3])
        w = torch.einsum("nip,kncp->knic", a.flatten(2), cols).flatten(2)
        if mod.bias is None:
            return w
        return torch.cat([w, g.flatten(3).sum(dim=3)], dim=-1)

    def quasidiag_owner(self, layer):
        # weight (in, out, kh, kw): coefficient W[c, o, :, :] interacts with b[o]
        cin, out = layer.weight_shape[:2]
        ks = _prod(layer.weight_shape[2:])
        return torch.arange(out).repeat_interleave(ks).repeat(cin)


# --------------------------------------------------------------------------------------
# normalisation layers: y = xhat * w + b
# --------------------------------------------------------------------------------------


class ElementwiseAffineMath(LayerMath):
    """``y = xhat * w (+ b)``. Subclasses give ``xhat`` and which dims ``w`` spans."""

    channel_dim = True  # w spans dim 1 (BatchNorm, GroupNorm); else the trailing dims

    def normalized(self, mod, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _sum_to_param(self, mod, x: Tensor) -> Tensor:
        """(K, N, *shape) -> (K, N, numel_w), summing over the dims w is broadcast over."""
        if self.channel_dim:
            return x.flatten(3).sum(dim=3) if x.dim() > 3 else x
        wdims = mod.weight.dim()
        lead = x.dim() - wdims
        if lead > 2:
            x = x.sum(dim=tuple(range(2, lead)))
        return x.flatten(2)

    @per_input
    def _xhat(self, mod, a):
        return self.normalized(mod, a)

    def per_example_grads(self, mod, a, g):
        w = self._sum_to_param(mod, g * self._xhat(mod, a))
        if getattr(mod, "bias", None) is None:
            return w
        return torch.cat([w, self._sum_to_param(mod, g)], dim=-1)


class BatchStatisticsError(RuntimeError, TypeError):
    """A module normalises with batch statistics: an example's output depends on the
    other examples of its batch, so no per-example quantity is defined (for any layer of
    the model, whether or not the module holds parameters or is in the collection)."""


@register("BatchNorm1d", "BatchNorm2d")
class BatchNormMath(ElementwiseAffineMath):
    def check_module(self, mod, name):
        self.check_batch_statistics(mod, name, check_training=False)

    def check_capture(self, mod, name):
        self.check_batch_statistics(mod, name)

    @staticmethod
    def check_batch_statistics(mod, name, check_training: bool = True) -> None:
        """Raise :class:`BatchStatisticsError` if the (any) batch-norm module ``mod``
        normalises with batch statistics: it has none of its own (track_running_stats=
        False), or, with ``check_training``, it is in training mode."""
        if mod.running_mean is None and mod.running_var is None:
            raise BatchStatisticsError(
                f"module '{name}' ({type(mod).__name__}) has track_running_stats=False: it "
                "always normalises with batch statistics, so per-example gradients are undefined"
            )
        if check_training and mod.training:
            raise BatchStatisticsError(
                f"module '{name}' ({type(mod).__name__}) is in training mode: it normalises "
                "with batch statistics, so per-example gradients are undefined; call "
                "model.eval() first"
            )

    def normalized(self, mod, a):
        shape = [1, -1] + [1] * (a.dim() - 2)
        mean = mod.running_mean.view(shape)
        std = torch.sqrt(mod.running_var.view(shape) + mod.eps)
        return (a - mean) / std


def check_examples_independent(model) -> None:
    """Refuse a model in which some module normalises with batch statistics (see
    :meth:`BatchNormMath.check_batch_statistics`), every batch-norm module checked: one
    without parameters (affine=False), of a type without kernels (BatchNorm3d) or left
    out of the collection mixes the examples of a batch all the same."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            BatchNormMath.check_batch_statistics(mod, name)


@register("GroupNorm")
class GroupNormMath(ElementwiseAffineMath):
    def normalized(self, mod, a):
        return F.group_norm(a, mod.num_groups, None, None, mod.eps)


@register("LayerNorm")
class LayerNormMath(ElementwiseAffineMath):
    channel_dim = False

    def normalized(self, mod, a):
        return F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)


@register("RMSNorm")
class RMSNormMath(ElementwiseAffineMath):
    channel_dim = False

    def normalized(self, mod, a):
        return F.rms_norm(a, mod.normalized_shape, None, mod.eps)


__all__ = ["LAYER_TYPES", "layer_math_for", "LayerMath", "AffineMath", "ElementwiseAffineMath", "KFACUnsupportedError",
           "UnsupportedLayerError", "BatchStatisticsError", "check_examples_independent"]
