"""One minibatch through the model: each layer's input, and the gradients of every output
function w.r.t. each layer's output.

This is the Goodfellow (2015) route the paper describes: PyTorch's own autograd runs the
backward pass; we only intercept what enters each layer (``a``) and the gradients w.r.t.
what leaves it (``g``). The ``K`` output functions are back-propagated either in one
vectorised backward (``is_grads_batched``) or one backward per output, whichever a timing
on the model's first batch finds clearly faster (and per output wherever an op has no
batching rule). Per output, a consumer that sums over outputs receives each output's
gradients as they come, without a stacked copy.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import _clock, check_examples_independent, input_memo

log = logging.getLogger("nngeo_dist.generator")


class NonFiniteOutputError(FloatingPointError):
    pass


class PerLayerCaptureError(RuntimeError):
    """The per-layer route (hooks) cannot split a parameter's gradient between its uses."""


@dataclass
class Captured:
    """What one minibatch left: ``out`` (N, K) outputs, per-layer inputs and output grads.

    ``inputs[name]``: (N, *in); ``grads[name]``: (K, N, *out), output-function-major.
    ``chunk_end``: whether these outputs close a chunk of at most ``max_outputs`` (a
    consumer holding a chunk's gradients to read each input once for all of them knows
    when to compute).
    """

    out: Tensor
    inputs: dict
    grads: dict
    k_total: int
    chunk_end: bool = True

    @property
    def n(self) -> int:
        return self.out.shape[0]


class LayerRecorder:
    """Forward hooks on the collection's modules recording inputs and outputs.

    A module called more than once in a forward pass (tied weights, recurrent use) is
    refused: per-layer kernels assume one call. If a recorded output is later modified
    in place (e.g. ``ReLU(inplace=True)``), the forward is re-run with outputs cloned, so
    the gradients we read are those of the value the layer produced.
    """

    def __init__(self, l_to_m: dict, maths: dict):
        self.l_to_m = l_to_m
        self.maths = maths
        self.clone_outputs = False
        self._handles = []
        self.inputs: dict = {}
        self.outputs: dict = {}
        self.versions: dict = {}

    def __enter__(self):
        for name, mod in self.l_to_m.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self):
        self.inputs, self.outputs, self.versions = {}, {}, {}

    def _hook(self, name):
        def hook(mod, inp, out):
            if name in self.outputs:
                raise PerLayerCaptureError(
                    f"module '{name}' was called twice in one forward pass (shared or "
                    "recurrent use): per-layer representations cannot split its gradient; "
                    "use PMatImplicit, or a LayerCollection without this module"
                )
            self.maths[name].check_capture(mod, name)
            if not out.requires_grad:
                # frozen parameters (requires_grad=False, e.g. Embedding.from_pretrained)
                # on an input needing no gradient: the output is outside autograd's graph;
                # a leaf in its place (returned as a copy, which may be modified in place)
                # receives the gradients
                self.inputs[name] = inp[0].detach()
                self.outputs[name] = out.detach().requires_grad_()
                return self.outputs[name].clone()
            if self.clone_outputs:
                self.inputs[name] = inp[0].detach().clone()
                self.outputs[name] = out
                return out.clone()
            self.inputs[name] = inp[0].detach()
            self.outputs[name] = out
            self.versions[name] = (inp[0]._version, out._version)

        return hook

    def modified_in_place(self) -> list:
        return [
            n for n, o in self.outputs.items()
            if n in self.versions and (self.inputs[n]._version, o._version) != self.versions[n]
        ]


def _check_finite(out: Tensor) -> None:
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).any(dim=-1).nonzero().flatten()[:5].tolist()
        raise NonFiniteOutputError(
            f"the model's outputs contain NaN or Inf (examples {bad} of this batch): check "
            "the inputs and the weights, or lower the learning rate that produced them"
        )


def _unit_cotangents(out: Tensor, ks: range) -> Tensor:
    """(len(ks), N, K): the cotangent selecting out[:, k], summed over examples, per k."""
    N, K = out.shape
    eye = torch.zeros(len(ks), N, K, dtype=out.dtype, device=out.device)
    for j, k in enumerate(ks):
        eye[j, :, k] = 1
    return eye


def _zeros_for_unused(grads, tensors, lead: tuple) -> list:
    return [torch.zeros(lead + t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(grads, tensors)]


def _grads_batched(out: Tensor, tensors: Sequence[Tensor], ks: range) -> list:
    """Gradients of out[:, k] (summed over examples) w.r.t. each tensor, for k in ks, in
    one vectorised backward: per tensor, a (len(ks), *tensor.shape) tensor."""
    gs = torch.autograd.grad(
        out, tensors, grad_outputs=_unit_cotangents(out, ks), is_grads_batched=True,
        retain_graph=True, allow_unused=True,
    )
    return _zeros_for_unused(gs, tensors, (len(ks),))


def _grads_looped(out: Tensor, tensors: Sequence[Tensor], ks: range) -> "Iterator[list]":
    """The same, one backward per output: yields, per k, a list of (1, *tensor.shape)
    views (no copy into a stacked tensor)."""
    eye = _unit_cotangents(out, ks)
    for j in range(len(ks)):
        gs = torch.autograd.grad(out, tensors, grad_outputs=eye[j], retain_graph=True, allow_unused=True)
        yield [g.unsqueeze(0) for g in _zeros_for_unused(gs, tensors, ())]


def _stacked(per_k: list) -> list:
    """Per-output lists of (1, ...) gradients -> per tensor, one (K, ...) tensor."""
    return [torch.cat(gs) for gs in zip(*per_k)]


#: model -> whether the vectorised backward won on it (one timing per model and process,
#: so repeated computations on a model agree bitwise)
_BACKWARD_CHOICE: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class Capturer:
    """Runs ``function(*batch)`` and captures per-layer inputs and output gradients.

    ``function`` returns (N, K). ``max_outputs`` bounds how many output functions are
    back-propagated together (memory is K x the layers' activations).
    """

    def __init__(self, model: nn.Module, function: Callable, layer_collection, max_outputs: Optional[int] = None):
        self.model = model
        self.function = function
        self.layer_collection = layer_collection
        self.l_to_m, _ = layer_collection.get_layerid_module_maps(model)
        self.maths = {n: l.math for n, l in layer_collection.layers.items()}
        self.max_outputs = max_outputs
        self._batched: Optional[bool] = _BACKWARD_CHOICE.get(model)  # else timed on the first batch
        self.foreign_users = _foreign_users(model, layer_collection, self.l_to_m)

    def check_modules(self) -> None:
        """Refuse module states in which per-example gradients are undefined, before any
        forward pass (a training-mode BatchNorm would update its running statistics),
        those of the collection's layers and any module of the model that mixes the
        examples of a batch (a BatchNorm without parameters or left out of the collection)."""
        for name, mod in self.l_to_m.items():
            self.maths[name].check_capture(mod, name)
        check_examples_independent(self.model)

    def forward(self, batch: Sequence) -> tuple[Tensor, LayerRecorder]:
        rec = LayerRecorder(self.l_to_m, self.maths)
        with rec:
            out = self._run(batch, rec)
            stale = rec.modified_in_place()
            if stale:
                log.info("outputs of %s are modified in place downstream; re-running with copies", stale)
                rec.clone_outputs = True
                rec.reset()
                out = self._run(batch, rec)
        return out, rec

    def _run(self, batch, rec):
        with torch.enable_grad():
            out = self.function(*batch)
        if out.dim() == 1:
            out = out.unsqueeze(1)
        if out.dim() != 2:
            raise ValueError(
                f"the function returned a tensor of shape {tuple(out.shape)}; it must return "
                "(batch, n_output): flatten extra dimensions in your function"
            )
        _check_finite(out)
        missing = [n for n in self.l_to_m if n not in rec.outputs]
        if missing and not out.requires_grad:
            raise RuntimeError("the function's output does not depend on any parameter")
        return out

    def capture(self, batch: Sequence, stream: bool = False) -> "Iterator[tuple[range, Captured]]":
        """Yield (output slice, Captured) for chunks of at most ``max_outputs`` outputs.

        ``stream=True`` (a consumer that sums over outputs): when one backward per output
        is the faster route, each output is yielded as soon as it is back-propagated, as
        views of autograd's own gradients, instead of being stacked with the others.
        """
        if self.foreign_users:
            users = ", ".join(f"'{m}' (tied to '{l}')" for m, l in self.foreign_users)
            raise PerLayerCaptureError(
                f"parameters of the collection are also used by module(s) {users}: "
                "per-layer representations would miss that use; use PMatImplicit, which "
                "differentiates through every use of a tied parameter"
            )
        out, rec = self.forward(batch)
        missing = [n for n in self.l_to_m if n not in rec.outputs]
        if missing:
            raise RuntimeError(
                f"layer '{missing[0]}' of the collection was not called by the function; "
                "build the LayerCollection from the layers the function uses"
            )
        names = list(self.l_to_m)
        K = out.shape[1]
        step = self.max_outputs or K
        tensors = [rec.outputs[n] for n in names]
        with input_memo():
            for k0 in range(0, K, step):
                ks = range(k0, min(K, k0 + step))
                for sub, grads in self._grads(out, tensors, ks, stream):
                    g = dict(zip(names, grads))
                    yield sub, Captured(out.detach()[:, sub.start:sub.stop], rec.inputs, g, K, sub.stop == ks.stop)

    def _grads(self, out, tensors, ks, stream) -> "Iterator[tuple[range, list]]":
        """(output slice, per-tensor gradients (len(slice), *shape)): ``ks`` at once, or
        output by output when looping and ``stream``."""
        if self._batched is None and len(ks) > 1:
            batched, grads = self._choose_backward(out, tensors, ks)
        elif self._batched is not False:
            try:
                batched, grads = True, _grads_batched(out, tensors, ks)
            except (RuntimeError, NotImplementedError) as e:  # an op without a batching rule
                log.info("vectorised backward unavailable (%s); one backward per output", e)
                self._batched = False
                batched, grads = False, _grads_looped(out, tensors, ks)
        else:
            batched, grads = False, _grads_looped(out, tensors, ks)
        if batched:
            yield ks, grads
        elif stream:
            for k, gk in zip(ks, grads):
                yield range(k, k + 1), gk
        else:
            yield ks, _stacked(list(grads))

    def _choose_backward(self, out, tensors, ks) -> tuple[bool, list]:
        """Time the vectorised backward against one backward per output on the first
        batch (after an untimed vectorised call, which sets vmap up; best of two each)
        and keep the vectorised one unless looping is clearly faster: vmap's batching
        rules win on dense layers, lose on some convolution/pooling backwards, and
        per-output chunks make some consumers run more, smaller products. Returns
        (vectorised?, that route's gradients), so that every batch (and every later
        pass) agrees bitwise."""
        try:
            _grads_batched(out, tensors, ks)
        except (RuntimeError, NotImplementedError) as e:
            log.info("vectorised backward unavailable (%s); one backward per output", e)
            self._batched = _BACKWARD_CHOICE[self.model] = False
            return False, _grads_looped(out, tensors, ks)
        # At most one route's gradients (K x the layers' activations) are held at a time:
        # the previous round's vectorised result is dropped before the next is made, and
        # the looped route's per-output gradients are dropped as they come (a list of
        # them, kept beside the vectorised ones, tripled the capture's memory).
        t_vec, t_loop = float("inf"), float("inf")
        for _ in range(2):  # _clock waits for a GPU's queued kernels: else only launches are timed
            grads = None
            t0 = _clock(out.device)
            grads = _grads_batched(out, tensors, ks)
            t1 = _clock(out.device)
            for _ in _grads_looped(out, tensors, ks):  # each output's gradients dropped as they come
                pass
            t2 = _clock(out.device)
            t_vec, t_loop = min(t_vec, t1 - t0), min(t_loop, t2 - t1)
        self._batched = t_loop >= LOOP_MARGIN * t_vec
        _BACKWARD_CHOICE[self.model] = self._batched
        log.info("backward over %d outputs: vectorised %.4fs, looped %.4fs", len(ks), t_vec, t_loop)
        if self._batched:
            return True, grads
        del grads
        return False, _grads_looped(out, tensors, ks)  # the same numbers, made as consumed


#: one backward per output is chosen only when it takes less than this fraction of the
#: vectorised backward's time
LOOP_MARGIN = 0.8


def _foreign_users(model: nn.Module, layer_collection, l_to_m: dict) -> list:
    """(module, layer) pairs where a module outside the collection owns a parameter of the
    collection's layer (tied weights)."""
    owner = {}
    for name, mod in l_to_m.items():
        for p in mod.parameters(recurse=False):
            owner[id(p)] = name
    hooked = set(id(m) for m in l_to_m.values())
    out = []
    for mname, mod in model.named_modules():
        if id(mod) in hooked:
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in owner:
                out.append((mname, owner[id(p)]))
                break
    return out
