"""A zoo of tiny float64 models with deterministic data, one per supported layer type.

Every factory in :data:`MODELS` is called as ``factory(n=11, batch_size=4, seed=0)`` and returns
``(model, batches, n_output)``:

- ``model``: an ``nn.Module`` in float64 and in eval mode (BatchNorm uses its running
  statistics), with non-trivial parameters (norm layers' affine parameters and BatchNorm's
  running statistics are randomised, not left at 1 / 0).
- ``batches``: a list of ``(x, y)`` tuples, ``x`` the input (float64, or int64 token ids for
  the embedding models), ``y`` int64 class labels in ``[0, max(n_output, 2))``; batch sizes
  are ``batch_size`` except the last one (n=11, batch_size=4 gives 4, 4, 3).
- ``n_output``: c, the number of outputs of ``model(x)`` (shape (N, c)).

``loader_of(batches, batch_size)`` gives a DataLoader over the concatenated tensors.
``nngeometry_supported(name)`` says whether nngeometry 0.4 handles every layer of that model.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["MODELS", "NNGEOMETRY_SUPPORTED", "loader_of", "nngeometry_supported", "make", "variant_of"]

DTYPE = torch.float64

Factory = Callable[..., Tuple[nn.Module, List[tuple], int]]
MODELS: Dict[str, Factory] = {}
NNGEOMETRY_SUPPORTED: set = set()


# --------------------------------------------------------------------------------------------
# helpers


class MeanOverDim(nn.Module):
    """Mean over one dimension (no parameters): pools a sequence or spatial axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(dim=self.dim)


def randomise_norms(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for the normalisation layers
    (float64; those without parameters or running statistics are left as they are)."""
    norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, norm_types):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1.0 + 0.3 * torch.randn(mod.weight.shape, generator=g, dtype=DTYPE))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g, dtype=DTYPE))
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and mod.running_mean is not None:
                mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=g, dtype=DTYPE))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g, dtype=DTYPE))


def _register(name: str, n_output: int, nngeometry: bool):
    """Registers ``build(g) -> (model, make_x(n, g))`` as ``MODELS[name]``."""

    def deco(build):
        def factory(n: int = 11, batch_size: int = 4, seed: int = 0):
            g = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)  # default module initialisation
            model, make_x = build(g)
            model = model.to(DTYPE)
            randomise_norms(model, g)
            model.eval()
            x = make_x(n, g)
            y = torch.randint(0, max(n_output, 2), (n,), generator=g)
            batches = [
                (x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, n, batch_size)
            ]
            return model, batches, n_output

        factory.__name__ = f"model_{name}"
        factory.__doc__ = build.__doc__
        factory.n_output = n_output
        MODELS[name] = factory
        if nngeometry:
            NNGEOMETRY_SUPPORTED.add(name)
        return factory

    return deco


def _normal(*shape):
    def make_x(n, g):
        return torch.randn((n, *shape), generator=g, dtype=DTYPE)

    return make_x


def _tokens(vocab: int, length: int):
    def make_x(n, g):
        return torch.randint(0, vocab, (n, length), generator=g)

    return make_x


def make(name: str, **kw):
    """``MODELS[name](**kw)``."""
    return MODELS[name](**kw)


def variant_of(c: int) -> str:
    """The FIM variant of a zoo model with ``c`` outputs (logits)."""
    return "classif_binary_logits" if c == 1 else "classif_logits"


def fresh_pair(name: str = "linear"):
    """(our model, nngeometry's model, loader, c): two identical fresh copies of a model of
    :data:`MODELS` (nngeometry leaves hooks on a model after an error) and its batches."""
    ours, batches, c = make(name)
    theirs, _, _ = make(name)
    return ours, theirs, loader_of(batches), c


def loader_of(batches: List[tuple], batch_size: Optional[int] = None) -> DataLoader:
    """A DataLoader (no shuffling) over the concatenation of ``batches``, field by field.

    ``batch_size`` defaults to the size of the first batch, which reproduces ``batches``.
    """
    fields = list(zip(*[b if isinstance(b, (tuple, list)) else (b,) for b in batches]))
    tensors = [torch.cat(f, dim=0) for f in fields]
    if batch_size is None:
        batch_size = tensors[0].shape[0] if len(batches) == 0 else batches[0][0].shape[0]
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def nngeometry_supported(name: str) -> bool:
    """Whether nngeometry 0.4 handles every parameterised layer of ``MODELS[name]``.

    nngeometry 0.4 knows Linear, Conv1d, Conv2d, ConvTranspose2d, BatchNorm1d/2d, GroupNorm
    and LayerNorm, with restrictions its per-example gradient code imposes: Linear and
    BatchNorm1d only on 2-d (N, F) inputs, GroupNorm only on 4-d inputs, LayerNorm only when
    the input is exactly (N, *normalized_shape), and the model input must be floating point.
    It knows neither Embedding nor RMSNorm.
    """
    if name not in MODELS:
        raise KeyError(name)
    return name in NNGEOMETRY_SUPPORTED


# --------------------------------------------------------------------------------------------
# the zoo


@_register("linear", n_output=3, nngeometry=True)
def _linear(g):
    """Linear(5, 6) -> tanh -> Linear(6, 3), with biases, on (N, 5)."""
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), _normal(5)


@_register("linear_nobias", n_output=4, nngeometry=True)
def _linear_nobias(g):
    """Linear(5, 6, bias=False) -> tanh -> Linear(6, 4, bias=False), on (N, 5)."""
    return (
        nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 4, bias=False)),
        _normal(5),
    )


@_register("linear_binary", n_output=1, nngeometry=True)
def _linear_binary(g):
    """Linear(5, 6) -> tanh -> Linear(6, 1): one logit, for classif_binary_logits."""
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)), _normal(5)


@_register("linear_seq", n_output=3, nngeometry=False)
def _linear_seq(g):
    """Linear(4, 5) on a sequence (N, T=3, 4) -> tanh -> mean over T -> Linear(5, 3)."""
    return (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), MeanOverDim(1), nn.Linear(5, 3)),
        _normal(3, 4),
    )


@_register("conv1d", n_output=3, nngeometry=True)
def _conv1d(g):
    """Conv1d(2, 3, 3, padding=1) -> tanh -> Conv1d(3, 2, 2, stride=2, dilation=2, bias=False)
    -> tanh -> flatten -> Linear(6, 3), on (N, 2, 8)."""
    return (
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv1d(3, 2, 2, stride=2, dilation=2, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        _normal(2, 8),
    )


@_register("conv2d", n_output=3, nngeometry=True)
def _conv2d(g):
    """Conv2d(2, 3, 3) -> tanh -> flatten -> Linear(27, 3), on (N, 2, 5, 5)."""
    return (
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)),
        _normal(2, 5, 5),
    )


@_register("conv2d_stride_pad", n_output=4, nngeometry=True)
def _conv2d_stride_pad(g):
    """Conv2d(2, 3, 3, stride=2, padding=1) -> tanh -> flatten -> Linear(27, 4), on
    (N, 2, 6, 6)."""
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)
        ),
        _normal(2, 6, 6),
    )


@_register("conv2d_dilation", n_output=3, nngeometry=True)
def _conv2d_dilation(g):
    """Conv2d(2, 3, 3, dilation=2, padding=1) -> tanh -> flatten -> Linear(27, 3), on
    (N, 2, 5, 5)."""
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, dilation=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
        ),
        _normal(2, 5, 5),
    )


@_register("conv2d_nobias", n_output=3, nngeometry=True)
def _conv2d_nobias(g):
    """Conv2d(2, 3, (2, 3), stride=(1, 2), bias=False) (non-square kernel, uneven stride)
    -> tanh -> flatten -> Linear(36, 3), on (N, 2, 5, 7)."""
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, (2, 3), stride=(1, 2), bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        _normal(2, 5, 7),
    )


@_register("convtranspose2d", n_output=3, nngeometry=True)
def _convtranspose2d(g):
    """ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1) (4x4 -> 8x8) -> tanh
    -> ConvTranspose2d(3, 2, 2, bias=False) (8x8 -> 9x9) -> tanh -> mean over rows
    -> flatten -> Linear(18, 3), on (N, 2, 4, 4)."""
    return (
        nn.Sequential(
            nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
            nn.Tanh(),
            nn.ConvTranspose2d(3, 2, 2, bias=False),
            nn.Tanh(),
            MeanOverDim(2),
            nn.Flatten(),
            nn.Linear(18, 3),
        ),
        _normal(2, 4, 4),
    )


@_register("batchnorm1d", n_output=3, nngeometry=True)
def _batchnorm1d(g):
    """Linear(5, 6) -> BatchNorm1d(6) on (N, 6) -> tanh -> Linear(6, 3)."""
    return (
        nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)),
        _normal(5),
    )


@_register("batchnorm1d_seq", n_output=3, nngeometry=False)
def _batchnorm1d_seq(g):
    """Conv1d(2, 4, 3) -> BatchNorm1d(4) on (N, 4, 4) -> tanh -> flatten -> Linear(16, 3), on
    (N, 2, 6)."""
    return (
        nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)
        ),
        _normal(2, 6),
    )


@_register("batchnorm2d", n_output=4, nngeometry=True)
def _batchnorm2d(g):
    """Conv2d(2, 3, 3) -> BatchNorm2d(3) -> tanh -> flatten -> Linear(12, 4), on (N, 2, 4, 4)."""
    return (
        nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)
        ),
        _normal(2, 4, 4),
    )


@_register("groupnorm1d", n_output=3, nngeometry=False)
def _groupnorm1d(g):
    """Conv1d(2, 4, 3) -> GroupNorm(2, 4) on (N, 4, 5) -> tanh -> flatten -> Linear(20, 3), on
    (N, 2, 7)."""
    return (
        nn.Sequential(
            nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)
        ),
        _normal(2, 7),
    )


@_register("groupnorm2d", n_output=3, nngeometry=True)
def _groupnorm2d(g):
    """Conv2d(2, 4, 3) -> GroupNorm(2, 4) on (N, 4, 3, 3) -> tanh -> flatten -> Linear(36, 3),
    on (N, 2, 5, 5)."""
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)
        ),
        _normal(2, 5, 5),
    )


@_register("layernorm", n_output=3, nngeometry=True)
def _layernorm(g):
    """Linear(5, 6) -> LayerNorm(6) -> tanh -> Linear(6, 3), on (N, 5)."""
    return (
        nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)),
        _normal(5),
    )


@_register("layernorm_nobias", n_output=3, nngeometry=True)
def _layernorm_nobias(g):
    """Linear(5, 6) -> LayerNorm(6, bias=False) -> tanh -> Linear(6, 3), on (N, 5)."""
    return (
        nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, bias=False), nn.Tanh(), nn.Linear(6, 3)),
        _normal(5),
    )


@_register("layernorm_2d", n_output=4, nngeometry=True)
def _layernorm_2d(g):
    """Conv1d(2, 3, 3, padding=1) -> LayerNorm((3, 4)) (normalized_shape of 2 dims) -> tanh
    -> flatten -> Linear(12, 4), on (N, 2, 4)."""
    return (
        nn.Sequential(
            nn.Conv1d(2, 3, 3, padding=1),
            nn.LayerNorm((3, 4)),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(12, 4),
        ),
        _normal(2, 4),
    )


@_register("layernorm_seq", n_output=3, nngeometry=False)
def _layernorm_seq(g):
    """Linear(4, 5) on (N, T=3, 4) -> LayerNorm(5) over the last dim of (N, 3, 5) -> tanh
    -> mean over T -> Linear(5, 3) (transformer-style)."""
    return (
        nn.Sequential(
            nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), MeanOverDim(1), nn.Linear(5, 3)
        ),
        _normal(3, 4),
    )


@_register("rmsnorm", n_output=3, nngeometry=False)
def _rmsnorm(g):
    """Linear(5, 6) -> RMSNorm(6) -> tanh -> Linear(6, 3), on (N, 5)."""
    return (
        nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 3)),
        _normal(5),
    )


@_register("embedding", n_output=3, nngeometry=False)
def _embedding(g):
    """Embedding(7, 4) on int64 tokens (N, T=5) -> mean over T -> Linear(4, 3)."""
    return (
        nn.Sequential(nn.Embedding(7, 4), MeanOverDim(1), nn.Linear(4, 3)),
        _tokens(7, 5),
    )


@_register("embedding_padidx", n_output=3, nngeometry=False)
def _embedding_padidx(g):
    """Embedding(7, 4, padding_idx=0) on int64 tokens (N, T=5) with 0s among them (its row
    gets no gradient) -> mean over T -> Linear(4, 3)."""
    return (
        nn.Sequential(nn.Embedding(7, 4, padding_idx=0), MeanOverDim(1), nn.Linear(4, 3)),
        _tokens(7, 5),
    )


@_register("mixed_cnn", n_output=4, nngeometry=True)
def _mixed_cnn(g):
    """Conv2d(2, 4, 3, stride=2, padding=1) -> BatchNorm2d(4) -> relu
    -> Conv2d(4, 4, 3, dilation=2, padding=2, bias=False) -> GroupNorm(2, 4) -> tanh
    -> flatten -> Linear(36, 6) -> LayerNorm(6) -> tanh -> Linear(6, 4), on (N, 2, 6, 6)."""
    return (
        nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, dilation=2, padding=2, bias=False),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 6),
            nn.LayerNorm(6),
            nn.Tanh(),
            nn.Linear(6, 4),
        ),
        _normal(2, 6, 6),
    )
