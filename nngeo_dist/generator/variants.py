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
MC_VARIANTS = ("classif_logits", "classif_logsoftmax", "segmentation_logits", "regression")


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
    (up to terms constant in w), so sum_t grad r_t grad r_t^T = mean_t g_t g_t^T.

    The draws are nngeometry 0.4's (same calls in the same order: the same matrix for the
    same seed), ``function(*batch)`` returning:

    - classif_logits: logits (N, C); y ~ softmax(f).
    - classif_logsoftmax: log-probabilities (N, C) (e.g. a model ending in LogSoftmax);
      y ~ exp(f).
    - segmentation_logits: logits (N, C, H, W), one class per pixel: at every pixel
      y ~ softmax over C, independently, and r_t is the log-likelihood of the whole
      drawn segmentation, the sum over pixels (any number of spatial dims is accepted).
    - regression: outputs (N, c) of a unit-variance Gaussian; y = f + eps.
    """
    _check(variant, MC_VARIANTS)
    if trials < 1:
        raise ValueError(f"trials={trials}: at least one draw per example is needed")
    scale = trials ** -0.5

    if variant == "classif_logits":
        def root(*batch):
            f = _classif_outputs(function(*batch), variant)
            return scale * _sampled_log_likelihood(torch.log_softmax(f, dim=1), trials, generator)
    elif variant == "classif_logsoftmax":
        def root(*batch):
            logp = _checked_log_probabilities(_classif_outputs(function(*batch), variant))
            return scale * _sampled_log_likelihood(logp, trials, generator)
    elif variant == "segmentation_logits":
        def root(*batch):
            f = function(*batch)
            if f.dim() < 3:
                raise ValueError(
                    f"variant segmentation_logits needs logits of shape (batch, C, H, W), a class "
                    f"per pixel; the function returns shape {tuple(f.shape)}: for one class per "
                    "example use classif_logits"
                )
            logp = torch.log_softmax(f, dim=1)
            n, c = f.shape[:2]
            per_pixel = logp.movedim(1, -1).reshape(-1, c)  # (n * pixels, C), pixel-major per example
            drawn = _sampled_log_likelihood(per_pixel, trials, generator)
            return scale * drawn.view(n, -1, trials).sum(dim=1)
    else:
        def root(*batch):
            f = function(*batch)
            eps = torch.randn((trials,) + f.shape, dtype=f.dtype, device=f.device, generator=generator)
            return scale * torch.einsum("tnc,nc->nt", eps, f)
    return root


def _sampled_log_likelihood(logp: Tensor, trials: int, generator: Optional[torch.Generator]) -> Tensor:
    """(M, C) log-probabilities -> (M, trials): log p(y_t) for y_t ~ exp(logp) drawn per
    row, with replacement (differentiable in logp; the draws are not)."""
    y = torch.multinomial(logp.detach().exp(), trials, replacement=True, generator=generator)
    return torch.gather(logp, 1, y)


def _classif_outputs(f: Tensor, variant: str) -> Tensor:
    if f.dim() != 2:
        raise ValueError(
            f"variant {variant} needs outputs of shape (batch, C); the function returns shape "
            f"{tuple(f.shape)}: for a class per pixel use segmentation_logits"
        )
    return f


def _checked_log_probabilities(f: Tensor) -> Tensor:
    """``f`` itself, once each row of exp(f) is known to sum to 1: logits given as
    log-probabilities would be renormalised by the draw and give a wrong matrix silently."""
    if f.numel():
        tol = max(1e-3, f.shape[1] * torch.finfo(f.dtype).eps)
        worst = (f.detach().exp().sum(dim=1) - 1).abs().max().item()
        if not worst <= tol:
            raise ValueError(
                f"variant classif_logsoftmax needs log-probabilities (rows of exp(f) summing to "
                f"1); the function's rows sum to 1 +- {worst:.3g}: for logits use classif_logits"
            )
    return f
