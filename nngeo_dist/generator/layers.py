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

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LAYER_TYPES: dict[str, type] = {}


def register(*kinds: str):
    def deco(cls):
        for k in kinds:
            LAYER_TYPES[k] = cls
        return cls

    return deco


def layer_math_for(kind: str) -> "LayerMath":
    try:
        return LAYER_TYPES[kind]()
    except KeyError:
        raise TypeError(f"no kernels for layer type {kind}") from None


def _square_sum_rows(x: Tensor) -> Tensor:
    """(K, N, p) -> (p,): sum over k and n of squares."""
    return (x * x).sum(dim=(0, 1))


class LayerMath:
    """Kernels of one layer type. Subclasses give ``per_example_grads``; the rest derive."""

    kind = "?"

    def check_module(self, mod, name: str) -> None:
        """Raise a clear error for a configuration these kernels do not cover."""

    def check_capture(self, mod, name: str) -> None:
        """Raise for a module state in which per-example gradients are undefined."""

    def per_example_grads(self, mod, a: Tensor, g: Tensor) -> Tensor:
        """(K, N, numel) per-example gradients of the K functions."""
        raise NotImplementedError

    # statistics derived from per-example gradients ---------------------------------------
    def diag(self, mod, a, g) -> Tensor:
        """(numel,) sum over k, n of squared per-example gradients."""
        return _square_sum_rows(self.per_example_grads(mod, a, g))

    def block(self, mod, a, g) -> Tensor:
        """(numel, numel) sum over k, n of outer products of per-example gradients."""
        pg = self.per_example_grads(mod, a, g).flatten(0, 1)
        return pg.t() @ pg

    def trace(self, mod, a, g) -> Tensor:
        return self.diag(mod, a, g).sum()

    def quasidiag(self, mod, a, g, layer) -> tuple[Tensor, Tensor]:
        """Diagonal (numel,) and, per bias coefficient o, the cross terms with row o of the
        weight, (o, numel_w / o): sum over k, n of  d_{W[o, :]} * d_{b[o]}."""
        pg = self.per_example_grads(mod, a, g)
        nw = layer.weight_numel
        n_out = layer.bias_numel
        w = pg[..., :nw].reshape(pg.shape[0], pg.shape[1], n_out, -1)
        b = pg[..., nw:]
        cross = torch.einsum("knoi,kno->oi", w, b)
        return _square_sum_rows(pg), cross

    # Gram (NTK) contributions -------------------------------------------------------------
    def gram_features(self, mod, a, g, n_total: Optional[int] = None):
        """What a Gram computation keeps of a batch for this layer (default: gradients)."""
        return self.per_example_grads(mod, a, g)

    def gram_pair(self, f1, f2) -> Tensor:
        """(K1, N1, K2, N2) sum over the layer's parameters of J_k(x_n) J_l(x_m)."""
        return torch.einsum("knp,lmp->knlm", f1, f2)

    def jvp(self, mod, a, g, v: Tensor) -> Tensor:
        """(K, N): J v restricted to this layer, ``v`` flat (numel,)."""
        return self.per_example_grads(mod, a, g) @ v

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

    def diag(self, mod, a, g):
        p, q = self.patches(mod, a), self.positions(mod, g)
        if p.shape[1] != 1:  # several positions: squares of sums need the gradients
            return _square_sum_rows(self.per_example_grads(mod, a, g))
        p, q = p[:, 0], q[:, :, 0]
        w = self.oi_to_flat((q * q).sum(0).t() @ (p * p))
        if not self.has_bias(mod):
            return w
        return torch.cat([w, (q * q).sum(dim=(0, 1))])

    def quasidiag(self, mod, a, g, layer):
        p, q = self.patches(mod, a), self.positions(mod, g)
        if p.shape[1] != 1 or self.weight_layout != "oi":
            return super().quasidiag(mod, a, g, layer)
        p, q = p[:, 0], q[:, :, 0]
        d = self.diag(mod, a, g)
        cross = (q * q).sum(0).t() @ p  # sum_kn g_o^2 p_i = d_{W[o,i]} d_{b[o]}
        return d, cross

    def jvp(self, mod, a, g, v):
        p, q = self.patches(mod, a), self.positions(mod, g)
        o, i = q.shape[-1], p.shape[-1]
        nw = o * i
        w = self.flat_to_oi(v[:nw], o, i)
        out = torch.einsum("nti,oi,knto->kn", p, w, q)
        if self.has_bias(mod):
            out = out + q.sum(dim=2) @ v[nw:]
        return out

    # KFAC factors (sums; DESIGN.md §1) ----------------------------------------------------
    def kfac_A(self, mod, a) -> Tensor:
        """(i', i') sum over examples and positions of p p^T, p with a trailing 1 for a bias."""
        p = self.patches(mod, a).flatten(0, 1)
        if self.has_bias(mod):
            p = torch.cat([p, torch.ones_like(p[:, :1])], dim=1)
        return p.t() @ p

    def kfac_G(self, mod, g) -> Tensor:
        """(o, o) sum over outputs and examples of (1/T) sum_t g_t g_t^T."""
        q = self.positions(mod, g)
        T = q.shape[2]
        q = q.flatten(0, 2)
        return (q.t() @ q) / T

    def kfe_diag(self, mod, a, g, evecs_a: Tensor, evecs_g: Tensor) -> Tensor:
        """(o, i') sum over k, n of squared per-example gradients in the Kronecker eigenbasis."""
        p = self.patches(mod, a)
        if self.has_bias(mod):
            p = torch.cat([p, torch.ones_like(p[..., :1])], dim=-1)
        q = self.positions(mod, g)
        pk = p @ evecs_a if evecs_a.dim() == 2 else p * evecs_a
        qk = q @ evecs_g
        if p.shape[1] == 1:
            return (qk[:, :, 0] ** 2).sum(0).t() @ (pk[:, 0] ** 2)
        gw = torch.einsum("knto,nti->knoi", qk, pk)
        return (gw * gw).sum(dim=(0, 1))

    # Gram: choose per layer between per-example gradients and the pairwise form --------
    def gram_features(self, mod, a, g, n_total=None):
        p, q = self.patches(mod, a), self.positions(mod, g)
        K, N, T, o = q.shape
        i = p.shape[-1]
        n = n_total or N
        pairwise = (K * n) ** 2 * T * T * (o + 1) + n * n * T * T * i
        via_grads = 2 * K * n * T * o * i + (K * n) ** 2 * (o * i + o)
        if pairwise <= via_grads:
            return ("pairwise", p, q, self.has_bias(mod))
        return ("grads", self.per_example_grads(mod, a, g))

    def gram_pair(self, f1, f2):
        if f1[0] == "grads":
            return super().gram_pair(f1[1], f2[1])
        _, p1, q1, bias = f1
        _, p2, q2, _ = f2
        K1, N1, T1, o = q1.shape
        K2, N2, T2, _ = q2.shape
        if T1 == 1 and T2 == 1:
            aa = p1[:, 0] @ p2[:, 0].t()
            gg = (q1[:, :, 0].reshape(K1 * N1, o) @ q2[:, :, 0].reshape(K2 * N2, o).t()).view(K1, N1, K2, N2)
            return gg * (aa + 1.0 if bias else aa)[None, :, None, :]
        aa = torch.einsum("nti,msi->ntms", p1, p2)
        if bias:
            aa = aa + 1.0
        gg = torch.einsum("knto,lmso->kntlms", q1, q2)
        return torch.einsum("kntlms,ntms->knlm", gg, aa)


@register("Linear")
class LinearMath(AffineMath):
    """``y = x W^T + b`` on inputs (N, *, i); every leading position is one patch."""

    def patches(self, mod, a):
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def positions(self, mod, g):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _conv_padding(mod, dims: int) -> tuple[list[int], tuple]:
    """Explicit (left, right) padding per spatial dim, torch's 'same'/'valid' resolved."""
    ks, dil = mod.kernel_size, mod.dilation
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return [0] * (2 * dims), (0,) * dims
        total = [dil[d] * (ks[d] - 1) for d in range(dims)]
        pads = []
        for d in reversed(range(dims)):  # F.pad order: last dim first
            pads += [total[d] // 2, total[d] - total[d] // 2]
        return pads, (0,) * dims
    return [0] * (2 * dims), tuple(mod.padding)


class ConvMath(AffineMath):
    dims = 2

    def check_module(self, mod, name):
        if mod.groups != 1:
            raise TypeError(
                f"module '{name}' ({type(mod).__name__}) has groups={mod.groups}; only "
                "groups=1 convolutions are supported: pass ignore_unsupported_layers=True "
                "to leave it out"
            )
        if mod.padding_mode != "zeros":
            raise TypeError(
                f"module '{name}' uses padding_mode='{mod.padding_mode}'; only 'zeros' "
                "is supported"
            )

    def _unfold(self, mod, a):
        pads, padding = _conv_padding(mod, self.dims)
        if any(pads):
            a = F.pad(a, pads)
        if self.dims == 1:
            cols = F.unfold(
                a.unsqueeze(2),
                kernel_size=(1, mod.kernel_size[0]),
                stride=(1, mod.stride[0]),
                padding=(0, padding[0]),
                dilation=(1, mod.dilation[0]),
            )
        else:
            cols = F.unfold(
                a, kernel_size=mod.kernel_size, stride=mod.stride,
                padding=padding, dilation=mod.dilation,
            )
        return cols  # (N, C*prod(k), T)

    def patches(self, mod, a):
        return self._unfold(mod, a).transpose(1, 2)

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
            raise TypeError(
                f"module '{name}' (Embedding) has max_norm set: it rewrites its weight "
                "during the forward pass, so gradients are not those of the stored weight"
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

    def kfac_A(self, mod, a):
        """The input factor is diagonal (one-hot patches): returned as its diagonal (V,)."""
        return self._onehot(mod, a).sum(dim=(0, 1))


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

    def per_example_grads(self, mod, a, g):
        w = self._sum_to_param(mod, g * self.normalized(mod, a))
        if getattr(mod, "bias", None) is None:
            return w
        return torch.cat([w, self._sum_to_param(mod, g)], dim=-1)


@register("BatchNorm1d", "BatchNorm2d")
class BatchNormMath(ElementwiseAffineMath):
    def check_module(self, mod, name):
        if not mod.track_running_stats:
            raise TypeError(
                f"module '{name}' ({type(mod).__name__}) has track_running_stats=False: it "
                "always normalises with batch statistics, so per-example gradients are undefined"
            )

    def check_capture(self, mod, name):
        if mod.training:
            raise RuntimeError(
                f"module '{name}' ({type(mod).__name__}) is in training mode: it normalises "
                "with batch statistics, so per-example gradients are undefined; call "
                "model.eval() first"
            )

    def normalized(self, mod, a):
        shape = [1, -1] + [1] * (a.dim() - 2)
        mean = mod.running_mean.view(shape)
        std = torch.sqrt(mod.running_var.view(shape) + mod.eps)
        return (a - mean) / std


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


__all__ = ["LAYER_TYPES", "layer_math_for", "LayerMath", "AffineMath", "ElementwiseAffineMath"]
