"""Forward- and reverse-mode products through ``function`` with the collection's
parameters as explicit inputs (forward-mode AD, ``torch.func``), for the implicit operators.

``J v`` for all outputs costs one forward-mode pass; ``J^T u`` one backward pass. Neither
forms a per-example gradient, and a module used several times (tied weights) is handled
as autograd handles it.

A layer whose inputs carry no tangent (the first layer, reading the data) gets its output's
tangent from us rather than from torch's forward-mode rule: every layer kind of a collection
is linear in its parameters, so that tangent is the layer's own output with the tangents as
parameters, one product; torch's rule for a product also multiplies the input's zero
tangent (materialised) by the weight, a second product of the same size.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call, jacrev, vmap


class _AsModule(nn.Module):
    """Lets ``functional_call`` swap the parameters that ``function`` reads from ``model``."""

    def __init__(self, model: nn.Module, function: Callable):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *batch):
        return self.function(*batch)


#: model -> {parameter names: indices of the parameters whose modules' inputs carry no
#: tangent}, found by the first J v pass on the model and kept for later ones (a wrong
#: entry, e.g. after a change of function, costs time, never exactness: an injected
#: tangent is added to the one torch propagates)
_CONSTANT_INPUTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class FunctionalModel:
    """``f(params, batch) -> (N, K)`` with ``params`` the collection's parameters in flat order."""

    def __init__(self, model: nn.Module, function: Callable, layer_collection):
        self.wrapper = _AsModule(model, function)
        named = layer_collection.named_parameters(model)
        self.names = ["model." + n for n, _ in named]
        self.params = [p for _, p in named]
        # the module of each parameter, and the modules whose inputs never carry a tangent
        # (None until a J v pass on this model finds them)
        self.owners = [model.get_submodule(n.rpartition(".")[0]) for n, _ in named]
        self._model = model
        found = _CONSTANT_INPUTS.get(model, {}).get(tuple(self.names))
        self.constant_inputs: Optional[set] = None if found is None else {self.owners[i] for i in found}

    def __call__(self, params: Sequence[Tensor], batch: Sequence) -> Tensor:
        out = functional_call(self.wrapper, dict(zip(self.names, params)), tuple(batch), strict=False)
        return out.unsqueeze(1) if out.dim() == 1 else out

    def as_tangents(self, tangents: Sequence[Tensor]) -> list[Tensor]:
        """``tangents`` (shaped like the parameters) laid out like the parameters, each in
        a storage of its own: forward-mode AD takes such a tangent as it is, while it
        copies any other (e.g. a slice of one flat vector) into fresh zeros on every
        dual number it makes, i.e. on every batch. Made once per pass over the data."""
        return [torch.empty_like(p, dtype=t.dtype).copy_(t) for p, t in zip(self.params, tangents)]

    def jvp(self, batch: Sequence, tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(f, J v), each (N, K); ``tangents`` shaped like the parameters.

        The first pass on a model finds the modules whose inputs carry no tangent; from
        then on :func:`_tangent_hooks` give their outputs the tangent (see the module
        docstring). Every parameter stays a dual number everywhere else, so that a use
        outside its module (a tied weight, a function reading it) keeps its tangent."""
        injected = self.constant_inputs or set()
        with forward_ad.dual_level():
            params = [forward_ad.make_dual(p.detach(), t) for p, t in zip(self.params, tangents)]
            hooks = [h for m in injected for h in _tangent_hooks(m)]
            seen: dict = {}
            if self.constant_inputs is None:
                hooks += [m.register_forward_pre_hook(_input_tangent_recorder(seen), with_kwargs=True)
                          for m in dict.fromkeys(self.owners)]
            try:
                out = self(params, batch)
            finally:
                for h in hooks:
                    h.remove()
            primal, tangent = forward_ad.unpack_dual(out)
        if self.constant_inputs is None:
            self.constant_inputs = {m for m, has_tangent in seen.items() if not has_tangent}
            found = {i for i, m in enumerate(self.owners) if m in self.constant_inputs}
            _CONSTANT_INPUTS.setdefault(self._model, {})[tuple(self.names)] = found
        return primal, torch.zeros_like(primal) if tangent is None else tangent

    def vjp(self, batch: Sequence, cotangent: Tensor) -> list[Tensor]:
        """J^T u summed over the batch, shaped like the parameters; ``cotangent`` (N, K)."""
        params = [p.detach().requires_grad_(True) for p in self.params]
        with torch.enable_grad():
            out = self(params, batch)
        grads = torch.autograd.grad(out, params, grad_outputs=cotangent, allow_unused=True)
        # an Embedding(sparse=True) gets a sparse gradient: the vector algebra is dense
        return [g.to_dense() if g is not None and g.is_sparse else g for g in grads]

    def per_example_jacobians(self, batch: Sequence) -> list[Tensor]:
        """Per parameter, (N, K, *shape): d f_k(x_n) / d param, one example at a time (vmap)."""
        params = tuple(p.detach() for p in self.params)
        tensors = [i for i, t in enumerate(batch) if isinstance(t, Tensor)]

        def single(ps, *examples):
            full = list(batch)
            for i, e in zip(tensors, examples):
                full[i] = e.unsqueeze(0)
            return self(ps, full)[0]

        jac = vmap(jacrev(single), in_dims=(None,) + (0,) * len(tensors))(params, *[batch[i] for i in tensors])
        return list(jac)


def _has_tangent(x) -> bool:
    return isinstance(x, Tensor) and forward_ad.unpack_dual(x).tangent is not None


def _primal(x):
    return forward_ad.unpack_dual(x).primal if isinstance(x, Tensor) else x


def _input_tangent_recorder(seen: dict) -> Callable:
    """A forward pre-hook recording, per module, whether any call's inputs carry a tangent."""
    def hook(mod, args, kwargs):
        seen[mod] = seen.get(mod, False) or any(_has_tangent(a) for a in (*args, *kwargs.values()))
    return hook


def _tangent_hooks(mod: nn.Module) -> list:
    """Hooks computing ``mod``'s output tangent from its parameters' tangents ourselves:
    before its forward, its dual parameters are swapped for their primal values (torch's
    forward-mode rule then does not run for it); after, they are put back and the output
    gets the tangent its parameters give it: ``mod`` is linear in its parameters, so that
    tangent is its output with the parameters' tangents (zero where it has none) as
    parameters. A tangent its inputs carry, if any, is propagated by torch and kept.
    Returns the two hook handles."""
    saved: list = []  # the dual parameters of the calls in progress
    ours = []  # non-empty during the call that computes the tangent

    def before(mod, args, kwargs):
        if ours:
            return None
        duals = {n: q for n, q in mod._parameters.items() if q is not None}
        for n, q in duals.items():
            mod._parameters[n] = forward_ad.unpack_dual(q).primal
        saved.append(duals)
        return None

    def after(mod, args, kwargs, out):
        if ours:
            return None
        duals = saved.pop()
        mod._parameters.update(duals)
        tangents = {}
        for n, q in duals.items():
            t = forward_ad.unpack_dual(q).tangent
            tangents[n] = torch.zeros_like(q) if t is None else t
        # on the inputs' primal values: a tangent they carry is torch's to propagate
        args = tuple(_primal(x) for x in args)
        kwargs = {k: _primal(x) for k, x in kwargs.items()}
        ours.append(True)
        try:
            extra = functional_call(mod, tangents, args, kwargs)
        finally:
            ours.pop()
        primal, tangent = forward_ad.unpack_dual(out)
        return forward_ad.make_dual(primal, extra if tangent is None else tangent + extra)

    return [mod.register_forward_pre_hook(before, with_kwargs=True),
            mod.register_forward_hook(after, with_kwargs=True)]
