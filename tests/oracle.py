"""Independent oracle for the tests: shares no code with ``nngeo_dist``.

Everything here is built from per-example Jacobians computed with
``torch.func.vmap(torch.func.jacrev(...))`` through ``torch.func.functional_call``, in float64,
and dense algebra on them. It is slow and memory-hungry on purpose: it is a definition, not an
implementation. Conventions follow DESIGN.md section 1:

- ``function(*batch) -> (N, c)``; default ``lambda *b: model(b[0])``.
- Jacobian ``J`` has shape ``(c, n, d)``: output, example, parameter.
- Parameters are flattened in the order of ``params`` (default: ``model.parameters()``), each
  tensor row-major.
- FIM variants: ``classif_logits`` F = 1/n sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i with
  p = softmax(f); ``classif_binary_logits`` (c = 1) F = 1/n sum_i s_i (1 - s_i) J_i^T J_i with
  s = sigmoid(f); ``regression`` and ``function`` F = 1/n sum_i J_i^T J_i.
- Gram: K[a, i, b, j] = J_a(x_i) . J_b(x_j), shape (c, n, c, n), no normalisation.

Each example is evaluated on its own, with a leading batch dimension of 1 put back inside the
vmapped function, so modules that need a batch dimension (BatchNorm, GroupNorm) work. Models
must hold float64 parameters; floating-point batch tensors are cast to float64.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

__all__ = [
    "VARIANTS",
    "default_function",
    "flat_params",
    "set_flat_params",
    "jacobian_and_outputs",
    "per_example_jacobian",
    "fim_dense",
    "gram",
]

VARIANTS = ("classif_logits", "classif_binary_logits", "regression", "function")


class _Call(nn.Module):
    """Holds ``model`` as a submodule so that ``functional_call`` reparametrises it while
    ``function`` (a closure over ``model``) runs."""

    def __init__(self, model: nn.Module, function: Callable):
        super().__init__()
        self.model = model
        self._function = function

    def forward(self, *batch):
        return self._function(*batch)


def default_function(model: nn.Module) -> Callable:
    """``function(*batch) = model(batch[0])``."""

    def function(*batch):
        return model(batch[0])

    return function


def _resolve_params(model: nn.Module, params: Optional[Sequence[torch.Tensor]]):
    if params is None:
        params = list(model.parameters())
    params = list(params)
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for p in params:
        if id(p) not in names_by_id:
            raise ValueError("a tensor in `params` is not a parameter of `model`")
        names.append(names_by_id[id(p)])
    if len(set(names)) != len(names):
        raise ValueError("`params` lists a parameter twice")
    for name, p in zip(names, params):
        if p.dtype != torch.float64:
            raise TypeError(
                f"the oracle works in float64: parameter {name!r} is {p.dtype}; "
                "call model.double() first"
            )
    return names, params


def _as_tuple(batch) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return tuple(batch)


def _cast(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.to(torch.float64)
    return t


def flat_params(model: nn.Module, params: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """All parameters (or ``params``), flattened row-major and concatenated, detached copy."""
    if params is None:
        params = list(model.parameters())
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def set_flat_params(
    model: nn.Module, vector: torch.Tensor, params: Optional[Sequence[torch.Tensor]] = None
) -> None:
    """Writes ``vector`` (as laid out by :func:`flat_params`) into the parameters, in place."""
    if params is None:
        params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {total}")
    start = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(vector[start : start + n].reshape(p.shape).to(p.dtype))
            start += n


def jacobian_and_outputs(
    model: nn.Module,
    function: Optional[Callable],
    batches: Iterable,
    params: Optional[Sequence[torch.Tensor]] = None,
):
    """Per-example Jacobians ``J`` (c, n, d) and outputs ``f`` (n, c), both float64.

    Each example is run alone (batch dimension of 1), under ``vmap`` over examples.
    """
    if function is None:
        function = default_function(model)
    names, params = _resolve_params(model, params)
    caller = _Call(model, function)
    full_names = ["model." + n for n in names]
    values = tuple(p.detach() for p in params)

    def one_example(pvals, *example):
        batch = tuple(e.unsqueeze(0) for e in example)
        out = functional_call(caller, dict(zip(full_names, pvals)), batch)
        if out.dim() == 1:
            out = out.unsqueeze(1)
        out = out.reshape(1, -1)[0]
        return out, out

    jacobians, outputs = [], []
    for batch in batches:
        batch = tuple(_cast(t) for t in _as_tuple(batch))
        n_b = batch[0].shape[0]
        in_dims = (None,) + (0,) * len(batch)
        jac, out = vmap(jacrev(one_example, argnums=0, has_aux=True), in_dims=in_dims)(
            values, *batch
        )
        # jac: tuple over params of (n_b, c, *p.shape)
        c = out.shape[1]
        jac = torch.cat([j.reshape(n_b, c, -1) for j in jac], dim=2)
        jacobians.append(jac)
        outputs.append(out)
    J = torch.cat(jacobians, dim=0).permute(1, 0, 2).contiguous()
    f = torch.cat(outputs, dim=0).detach()
    return J.detach(), f


def per_example_jacobian(
    model: nn.Module,
    function: Optional[Callable],
    batches: Iterable,
    params: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """J[a, i, k] = d f_a(x_i) / d w_k, shape (c, n, d), float64."""
    return jacobian_and_outputs(model, function, batches, params)[0]


def fim_dense(
    model: nn.Module,
    batches: Iterable,
    variant: str = "classif_logits",
    function: Optional[Callable] = None,
    params: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Dense Fisher Information Matrix (d, d) in closed form, float64.

    ``function`` (default ``model(batch[0])``) gives the logits (classif_*), the mean
    (regression), or for variant ``function`` the function whose covariance of gradients
    1/n sum_i J_i^T J_i is wanted.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}")
    J, f = jacobian_and_outputs(model, function, batches, params)
    c, n, d = J.shape
    if variant == "classif_logits":
        p = torch.softmax(f, dim=1)  # (n, c)
        H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (n, c, c)
        F = torch.einsum("aik,iab,bil->kl", J, H, J)
    elif variant == "classif_binary_logits":
        if c != 1:
            raise ValueError(f"classif_binary_logits needs one output, got {c}")
        s = torch.sigmoid(f[:, 0])
        F = torch.einsum("ik,i,il->kl", J[0], s * (1 - s), J[0])
    else:  # regression, function
        F = torch.einsum("aik,ail->kl", J, J)
    return F / n


def gram(
    model: nn.Module,
    function: Optional[Callable],
    batches: Iterable,
    params: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Empirical NTK Gram tensor K[a, i, b, j] = J_a(x_i) . J_b(x_j), shape (c, n, c, n)."""
    J = per_example_jacobian(model, function, batches, params)
    return torch.einsum("aik,bjk->aibj", J, J)
