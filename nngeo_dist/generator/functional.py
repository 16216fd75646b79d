"""Forward- and reverse-mode products through ``function`` with the collection's
parameters as explicit inputs (``torch.func``), for the implicit operators.

``J v`` for all outputs costs one forward-mode pass; ``J^T u`` one backward pass. Neither
forms a per-example gradient, and a module used several times (tied weights) is handled
as autograd handles it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vmap


class _AsModule(nn.Module):
    """Lets ``functional_call`` swap the parameters that ``function`` reads from ``model``."""

    def __init__(self, model: nn.Module, function: Callable):
        super().__init__()
        self.model = model
        self.function = function

    def forward(self, *batch):
        return self.function(*batch)


class FunctionalModel:
    """``f(params, batch) -> (N, K)`` with ``params`` the collection's parameters in flat order."""

    def __init__(self, model: nn.Module, function: Callable, layer_collection):
        self.wrapper = _AsModule(model, function)
        named = layer_collection.named_parameters(model)
        self.names = ["model." + n for n, _ in named]
        self.params = [p for _, p in named]

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
        """(f, J v), each (N, K); ``tangents`` shaped like the parameters."""
        primals = tuple(p.detach() for p in self.params)
        return jvp(lambda *ps: self(ps, batch), primals, tuple(tangents))

    def vjp(self, batch: Sequence, cotangent: Tensor) -> list[Tensor]:
        """J^T u summed over the batch, shaped like the parameters; ``cotangent`` (N, K)."""
        params = [p.detach().requires_grad_(True) for p in self.params]
        with torch.enable_grad():
            out = self(params, batch)
        return list(torch.autograd.grad(out, params, grad_outputs=cotangent, allow_unused=True))

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
