"""FIM "square roots": functions r(x) (N, K) with F = 1/n sum_i J_r(x_i)^T J_r(x_i).

Each FIM of DESIGN.md §1 is the covariance of the Jacobian of such a function, so every
representation is built from the one generator, whatever the variant. Quantities marked
"detached" are constants for differentiation.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

VARIANTS = ("classif_logits", "classif_binary_logits", "regression")
MC_VARIANTS = ("classif_logits", "regression")


def _check(variant: str, valid) -> None:
    if variant not in valid:
        raise ValueError(f"unknown variant '{variant}'; valid variants: {', '.join(valid)}")


def fim_root(function: Callable, variant: str) -> Callable:
    """Closed-form FIM square root of ``function``'s outputs for ``variant``.

    - classif_logits: the c - 1 rows of the exact Cholesky factor of the multinomial
      covariance (Tanabe & Sagae 1992): with p = softmax(f) detached and the tail masses
      q_k = sum_{j>k} p_j, r_k = sqrt(p_k q_k / q_{k-1}) (f_k - sum_{j>k} p_j f_j / q_k),
      so that sum_k grad r_k grad r_k^T = J^T (diag(p) - p p^T) J with one output fewer
      than c to back-propagate.
    - classif_binary_logits: r = sqrt(s (1 - s)) f, s = sigmoid(f) detached (c = 1).
    - regression: r = f (unit-variance Gaussian).
    """
    _check(variant, VARIANTS)

    if variant == "classif_logits":
        def root(*batch):
            return _multinomial_cholesky_root(function(*batch))
    elif variant == "classif_binary_logits":
        def root(*batch):
            f = function(*batch)
            if f.dim() == 2 and f.shape[1] != 1:
                raise ValueError(
                    f"variant classif_binary_logits needs one logit per example; the function "
                    f"returns {f.shape[1]}: use classif_logits"
                )
            s = torch.sigmoid(f).detach()
            return (s * (1 - s)).sqrt() * f
    else:
        def root(*batch):
            return function(*batch)
    return root


def _multinomial_cholesky_root(f: Tensor) -> Tensor:
    """(N, c) logits -> (N, c - 1) rows r_k (see :func:`fim_root`); a single logit has
    a zero Fisher and gives one zero row."""
    if f.dim() != 2:
        raise ValueError(
            f"variant classif_logits needs logits of shape (batch, c); the function returns "
            f"shape {tuple(f.shape)}: for one logit per example use "
            "variant='classif_binary_logits', else return (batch, c)"
        )
    if f.shape[1] == 1:
        return f * 0
    c = f.shape[1]
    # strict upper "tail" operator: (x @ tail)[:, k] = sum_{j>k} x_j, k = 0..c-2
    tail = torch.ones(c, c - 1, dtype=f.dtype, device=f.device).tril(-1)
    p = torch.softmax(f, dim=1).detach()
    q = p @ tail  # q_k = sum_{j>k} p_j, summed forwards: no cancellation when p_1 ~ 1
    q_prev = q + p[:, :-1]  # q_{k-1} = sum_{j>=k} p_j
    tiny = torch.finfo(f.dtype).tiny
    coef = (p[:, :-1] * q / q_prev.clamp_min(tiny)).sqrt()
    # r_n = f_n M_n with M[n, j, k] = coef_k (delta_jk - [j > k] p_j / q_k): the
    # differentiated path is one product (elementwise ops are slow under forward AD)
    eye = torch.eye(c, c - 1, dtype=f.dtype, device=f.device)
    M = (eye - tail * (p[:, :, None] / q.clamp_min(tiny)[:, None, :])) * coef[:, None, :]
    return torch.bmm(f.unsqueeze(1), M).squeeze(1)


def monte_carlo_root(function: Callable, variant: str, trials: int, generator: Optional[torch.Generator]) -> Callable:
    """Sampled FIM square root: y_t ~ p(y|x), r_t = log p(y_t | x) / sqrt(trials)
    (up to terms constant in w), so sum_t grad r_t grad r_t^T = mean_t g_t g_t^T."""
    _check(variant, MC_VARIANTS)
    if trials < 1:
        raise ValueError(f"trials={trials}: at least one draw per example is needed")
    scale = trials ** -0.5

    if variant == "classif_logits":
        def root(*batch):
            logp = torch.log_softmax(function(*batch), dim=1)
            y = torch.multinomial(logp.detach().exp(), trials, replacement=True, generator=generator)
            return scale * torch.gather(logp, 1, y)
    else:
        def root(*batch):
            f = function(*batch)
            eps = torch.randn((trials,) + f.shape, dtype=f.dtype, device=f.device, generator=generator)
            return scale * torch.einsum("tnc,nc->nt", eps, f)
    return root
