"""The two backward routes and the kernels' input transforms.

Per model, the capturer back-propagates all outputs in one vectorised backward, or one
backward per output, which a summing consumer (statistics, Jacobian rows) receives output
by output. Both routes, with and without output chunking (``max_outputs``), must give the
oracle's numbers. Convolution patches are built by strided copies (not im2col) and are
memoised within a captured batch: both checked against ``F.unfold`` and by identity.
Kernels with two equivalent routes (QuasiDiag of a convolution: from the patches or from
the convolution's own weight gradient) are timed once per shape; each route is checked
against the oracle.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oracle
from checks import block_mask, rel
from test_kfac import f64, nngeometry_fim  # noqa: F401 - f64 is a fixture
from models import loader_of, make, variant_of
from nngeo_dist import FIM, GramMatrix, Jacobian
from nngeo_dist.generator import capture
from nngeo_dist.generator import layers
from nngeo_dist.generator.layers import input_memo, layer_math_for
from nngeo_dist.object import PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC, PMatQuasiDiag

RTOL = 1e-10
ROUTED = ["linear_seq", "conv1d", "conv2d_stride_pad", "groupnorm2d", "embedding_padidx", "mixed_cnn"]
FACTORED = ["conv2d_stride_pad", "conv2d_dilation", "linear"]  # nngeometry knows them


def routed(name: str, vectorised: bool):
    """The zoo model with the capturer's backward route fixed (as the first-batch timing
    would leave it)."""
    model, batches, c = make(name)
    capture._BACKWARD_CHOICE[model] = vectorised
    return model, batches, c


@pytest.mark.parametrize("max_outputs", [None, 2])
@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "looped"])
@pytest.mark.parametrize("name", ROUTED)
def test_statistics_match_oracle_on_both_routes(name, vectorised, max_outputs):
    model, batches, c = routed(name, vectorised)
    want = oracle.fim_dense(model, batches, variant_of(c))
    loader = loader_of(batches)
    kw = dict(variant=variant_of(c), max_outputs=max_outputs, progress=False)
    dense = FIM(model, loader, PMatDense, **kw).to_torch()
    diag = FIM(model, loader, PMatDiag, **kw).to_torch()
    blocks = FIM(model, loader, PMatBlockDiag, **kw)
    assert rel(dense, want) < RTOL
    assert rel(diag, torch.diag(torch.diag(want))) < RTOL
    assert rel(blocks.to_torch(), want * block_mask(blocks.layer_collection)) < RTOL


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "looped"])
@pytest.mark.parametrize("name", ROUTED)
def test_jacobian_and_gram_match_oracle_on_both_routes(name, vectorised):
    model, batches, c = routed(name, vectorised)
    J = oracle.per_example_jacobian(model, None, batches)
    loader = loader_of(batches)
    assert rel(Jacobian(model, loader, max_outputs=2, progress=False).to_torch(), J) < RTOL
    gram = GramMatrix(model, loader, progress=False).to_torch()
    assert rel(gram, torch.einsum("aik,bjk->aibj", J, J)) < RTOL


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "looped"])
@pytest.mark.parametrize("name", FACTORED)
def test_factored_representations_match_nngeometry_on_both_routes(name, vectorised, f64):
    """KFAC, EKFAC (with its refitted diagonal) and QuasiDiag read gradients chunk by
    chunk: on either route, nngeometry 0.4's matrices."""
    model, batches, c = routed(name, vectorised)
    loader = loader_of(batches)
    kw = dict(variant=variant_of(c), progress=False)
    ekfac = FIM(model, loader, PMatEKFAC, **kw)
    ekfac.update_diag(loader)
    ekfac_ref = nngeometry_fim(model, loader, "PMatEKFAC", kw["variant"])
    ekfac_ref.update_diag(loader)
    assert rel(ekfac.to_torch(), ekfac_ref.to_torch()) < RTOL
    for rep in (PMatKFAC, PMatQuasiDiag):
        ref = nngeometry_fim(model, loader, rep.__name__, kw["variant"]).to_torch()
        assert rel(FIM(model, loader, rep, **kw).to_torch(), ref) < RTOL


# ------------------------------------------------------------------------------ patches


CONVS = [
    nn.Conv2d(3, 4, 3, padding=1),
    nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
    nn.Conv2d(3, 4, 3, dilation=2, padding=2),
    nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2)),
    nn.Conv2d(3, 4, 4, stride=3, padding="valid"),
    nn.Conv1d(3, 4, 3, stride=2, padding=1),
    nn.Conv1d(3, 4, 4, padding="same", dilation=2),
]


def conv_case(conv):
    """(the convolution in float64, an input batch of 5, its kernels)."""
    spatial = (7, 9) if isinstance(conv, nn.Conv2d) else (11,)
    return conv.double(), torch.randn(5, 3, *spatial, dtype=torch.float64), layer_math_for(type(conv).__name__)


@pytest.mark.parametrize("conv", CONVS, ids=lambda m: repr(m))
def test_patches_equal_unfold(conv):
    conv, a, math = conv_case(conv)
    p = math.patches(conv, a)  # (N, T, i)
    y = conv(a)
    T = y[0, 0].numel()
    # oracle: the convolution itself is W p_t + b at every position
    out = torch.einsum("nti,oi->not", p, conv.weight.reshape(conv.out_channels, -1))
    assert p.shape == (5, T, conv.weight[0].numel())
    assert rel(out + conv.bias[:, None], y.reshape(5, conv.out_channels, -1)) < 1e-12
    if isinstance(conv, nn.Conv2d) and not isinstance(conv.padding, str):
        want = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        assert torch.equal(p, want.transpose(1, 2))


@pytest.mark.parametrize("conv", CONVS, ids=lambda m: repr(m))
def test_weight_grads_by_conv_equal_torch_func_per_example_gradients(conv):
    conv, a, math = conv_case(conv)
    gk = torch.randn_like(conv(a))  # one output function's gradients (N, o, *out)

    def pulled_back(w, x, gx):  # <gk_n, conv_w(x_n)>: its gradient in w is example n's
        return (torch.func.functional_call(conv, {"weight": w, "bias": conv.bias}, (x[None],)) * gx[None]).sum()

    want = torch.func.vmap(torch.func.grad(pulled_back), in_dims=(None, 0, 0))(conv.weight.detach(), a, gk)
    assert rel(math.weight_grads_by_conv(conv, a, gk), want.flatten(2)) < 1e-12


@pytest.mark.parametrize("route", ["patches", "conv"])
@pytest.mark.parametrize("name", ["conv1d", "conv2d_stride_pad", "conv2d_dilation", "conv2d_nobias", "mixed_cnn"])
def test_convolution_kernels_on_each_route(name, route, monkeypatch):
    """Per-example gradients (Jacobian, Gram), Diag and QuasiDiag of convolutions, from
    the patches or from the convolution's weight gradient, against the oracle."""
    from test_quasidiag import pattern

    monkeypatch.setattr(layers, "fastest", lambda key, routes, device: routes[route]())
    model, batches, c = make(name)
    variant = variant_of(c)
    loader = loader_of(batches)
    J = oracle.per_example_jacobian(model, None, batches)
    F = oracle.fim_dense(model, batches, variant)
    assert rel(Jacobian(model, loader).to_torch(), J) < RTOL
    assert rel(GramMatrix(model, loader, max_outputs=1).to_torch(), torch.einsum("aik,bjk->aibj", J, J)) < RTOL
    assert rel(FIM(model, loader, PMatDiag, variant=variant).get_diag(), torch.diagonal(F)) < RTOL
    assert rel(FIM(model, loader, PMatQuasiDiag, variant=variant).to_torch(), F * pattern(model)) < RTOL


class _FakeRoutes:
    """Routes that advance a fake clock by scripted durations (one per call), and record
    their calls and what a route writing into a caller's buffer would leave there."""

    def __init__(self, monkeypatch, durations: dict):
        self.now, self.calls, self.buffer = 0.0, [], None
        self.durations = {n: list(d) for n, d in durations.items()}
        monkeypatch.setattr(layers, "_FASTEST", {})
        monkeypatch.setattr(layers, "_clock", lambda device: self.now)

    def routes(self) -> dict:
        def route(name):
            def run():
                self.calls.append(name)
                self.now += self.durations[name].pop(0) if self.durations[name] else 0.0
                self.buffer = name
                return name
            return run
        return {n: route(n) for n in self.durations}


def test_fastest_decides_at_once_when_one_route_is_clearly_faster(monkeypatch):
    fake = _FakeRoutes(monkeypatch, {"quick": [9.0, 1.0], "slow": [9.0, 2.5]})
    assert layers.fastest(("k",), fake.routes(), torch.device("cpu")) == "quick"
    # one set-up run each, one timed round (2.5 > ROUTE_CLEAR x 1), then the chosen route
    # once more: its buffers hold its own numbers
    assert fake.calls == ["quick", "slow", "quick", "slow", "quick"] and fake.buffer == "quick"
    assert layers.fastest(("k",), fake.routes(), torch.device("cpu")) == "quick"
    assert fake.calls[5:] == ["quick"]  # kept for the key: no more timing
    assert layers.fastest(("other",), {"only": fake.routes()["slow"]}, torch.device("cpu")) == "slow"
    assert fake.calls[6:] == ["slow"]  # a single route is not timed


def test_fastest_takes_the_best_of_interleaved_rounds_when_routes_are_close(monkeypatch):
    # "a" is slowed in its first two timed rounds (a busy machine) and is the faster one;
    # one timing each would keep "b"
    fake = _FakeRoutes(monkeypatch, {"a": [9.0, 3.0, 3.0, 1.0], "b": [9.0, 2.0, 2.0, 1.5]})
    assert layers.fastest(("k",), fake.routes(), torch.device("cpu")) == "a"
    assert fake.calls == ["a", "b"] * (1 + layers.ROUTE_ROUNDS) + ["a"] and fake.buffer == "a"


def test_patches_memoised_within_a_batch_only():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    math = layer_math_for("Conv2d")
    a = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    with input_memo():
        p1 = math.patch_columns(conv, a)
        assert math.patch_columns(conv, a) is p1
        a.mul_(2)  # an input changed in place is unfolded again
        p2 = math.patch_columns(conv, a)
        assert p2 is not p1 and torch.equal(p2[:-1], 2 * p1[:-1])  # the last row: ones (bias)
        assert torch.equal(p2[-1], torch.ones_like(p2[-1]))
    assert math.patch_columns(conv, a) is not p2  # outside a batch: no memo


def test_unknown_backward_route_is_timed_once_per_model():
    model, batches, c = make("conv2d")
    capture._BACKWARD_CHOICE.pop(model, None)
    FIM(model, loader_of(batches), PMatDiag, progress=False)
    assert capture._BACKWARD_CHOICE[model] in (True, False)
