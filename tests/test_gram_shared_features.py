"""Gram contributions of layers whose output gradients are the same for every example (the
last linear layer of raw outputs; a linear layer followed by another): their features are
kept once per output and paired without a (c n)^2 product of gradients. Against the
oracle, with the route checked to be taken."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import oracle
from checks import rel
from models import loader_of
from nngeo_dist import GramMatrix, LayerCollection
from nngeo_dist.generator.generator import Generator


def _batches(n_in: int, sizes=(4, 1, 3)):
    torch.manual_seed(1)
    x = torch.randn(sum(sizes), n_in, dtype=torch.float64)
    out, e0 = [], 0
    for s in sizes:  # a batch of one example takes the plain route against shared ones
        out.append((x[e0:e0 + s],))
        e0 += s
    return out


def _shared_layers(model, function=None, layer_collection=None) -> set:
    """Names of the layers whose Gram features of a batch of 4 are expanded over examples."""
    gen = Generator(model, function, layer_collection)
    (n_b, [f]), *_ = gen.gram_features(loader_of(_batches(model[0].in_features)))
    return {name for name, (_, q, _, _) in f.items() if q.stride(1) == 0}


def _model(*, bias: bool = True, stacked: bool = False):
    torch.manual_seed(0)
    head = [nn.Linear(7, 5), nn.Linear(5, 4, bias=bias)] if stacked else [nn.Linear(7, 4, bias=bias)]
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), *head).double().eval()


@pytest.mark.parametrize("bias", [True, False])
def test_last_linear_layer_of_raw_outputs(bias):
    model = _model(bias=bias)
    assert _shared_layers(model) == {"2"}  # identity products: only diagonal blocks written
    batches = _batches(6)
    got = GramMatrix(model, loader_of(batches), progress=False).to_torch()
    assert rel(got, oracle.gram(model, None, batches)) < 1e-12


def test_two_linear_layers_in_a_row():
    """The first of the two gets gradients W^T e_k: shared, with dense products."""
    model = _model(stacked=True)
    assert _shared_layers(model) == {"2", "3"}
    batches = _batches(6)
    got = GramMatrix(model, loader_of(batches), progress=False).to_torch()
    assert rel(got, oracle.gram(model, None, batches)) < 1e-12


@pytest.mark.parametrize("mix", ["dense", "diagonal"])
def test_outputs_mixed_by_the_function(mix):
    """A function mixing the outputs: the last layer's products are dense, or diagonal
    with other values than 1."""
    model = _model()
    m = torch.randn(4, 3, dtype=torch.float64) if mix == "dense" else torch.diag(
        torch.tensor([2.0, -3.0, 0.5], dtype=torch.float64)).repeat(2, 1)[:4]

    def function(x):
        return model(x) @ m

    assert _shared_layers(model, function) == {"2"}
    batches = _batches(6)
    got = GramMatrix(model, loader_of(batches), function=function, n_output=3,
                     progress=False).to_torch()
    assert rel(got, oracle.gram(model, function, batches)) < 1e-12


def test_only_the_shared_layer():
    """The shared layer alone writes (does not accumulate into) the Gram."""
    model = _model()
    lc = LayerCollection.from_model(model).sub_collection(["2"])
    batches = _batches(6)
    got = GramMatrix(model, loader_of(batches), layer_collection=lc, progress=False).to_torch()
    J = oracle.per_example_jacobian(model, None, batches, params=list(model[2].parameters()))
    assert rel(got, torch.einsum("aik,bjk->aibj", J, J)) < 1e-12


def test_outputs_depending_on_the_example_are_not_shared():
    """Gradients that differ by example (a non-linearity after the layer) are not shared."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh()).double().eval()
    assert _shared_layers(model) == set()
    batches = _batches(6)
    got = GramMatrix(model, loader_of(batches), progress=False).to_torch()
    assert rel(got, oracle.gram(model, None, batches)) < 1e-12
