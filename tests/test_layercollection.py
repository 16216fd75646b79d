"""LayerCollection: which parameters, grouped by layer, and where each sits in a flat vector
(DESIGN.md §1: layers in named_modules() order, each weight row-major then bias), the
layer types of issue 2, unsupported modules, and sub-collections, whose FIMs, Gram
matrices and Jacobians equal the oracle restricted to their parameters (1e-10).
"""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

import oracle
from models import MODELS, loader_of, make

from nngeo_dist import FIM, GramMatrix, Jacobian, LayerCollection
from nngeo_dist.layercollection import UnsupportedLayerError
from nngeo_dist.object import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
    PVector,
)
from checks import rel

RTOL = 1e-10
ALL = list(MODELS)
pm = pytest.mark.parametrize


models = pm("name", ALL)




def parametrised_modules(model):
    return [(n, m) for n, m in model.named_modules() if list(m.parameters(recurse=False))]


# ------------------------------------------------------------------------------------------
# from_model on the zoo
@models
def test_from_model_layers_and_order(name):
    model, _, _ = make(name)
    lc = LayerCollection.from_model(model)
    mods = parametrised_modules(model)
    assert list(lc.layers) == [n for n, _ in mods]
    assert len(lc) == len(mods) and list(lc) == list(lc.layers)
    assert lc.numel() == sum(p.numel() for p in model.parameters())
    for (n, mod), (ln, layer) in zip(mods, lc.layers.items()):
        assert layer.kind == type(mod).__name__
        assert layer.weight_shape == tuple(mod.weight.shape)
        if getattr(mod, "bias", None) is None:
            assert layer.bias_shape is None and not layer.has_bias
        else:
            assert layer.bias_shape == tuple(mod.bias.shape)
        assert layer.numel() == sum(p.numel() for p in mod.parameters(recurse=False))
    # p_pos: cumulative offsets in layer order
    off = 0
    for ln, layer in lc.layers.items():
        assert lc.p_pos[ln] == off
        off += layer.numel()
    assert off == lc.numel()


@models
def test_flat_order_is_model_parameters_order(name):
    """For the zoo, the flat order is torch.cat([p.flatten() for p in model.parameters()])
    (also the oracle's order)."""
    model, _, _ = make(name)
    lc = LayerCollection.from_model(model)
    params = lc.parameters(model)
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]
    assert [n for n, _ in lc.named_parameters(model)] == [n for n, _ in model.named_parameters()]
    assert lc.shapes() == [tuple(p.shape) for p in model.parameters()]
    flat = PVector.from_model(model, lc).get_flat_representation()
    assert torch.equal(flat, oracle.flat_params(model))


def test_layer_types_of_issue_2_all_present_in_the_zoo():
    kinds = set()
    for name in ALL:
        model, _, _ = make(name)
        kinds |= {l.kind for l in LayerCollection.from_model(model).layers.values()}
    assert kinds >= {
        "Linear", "Conv1d", "Conv2d", "ConvTranspose2d", "BatchNorm1d", "BatchNorm2d",
        "GroupNorm", "LayerNorm", "RMSNorm", "Embedding",
    }


def test_equality_and_hash():
    m1, _, _ = make("conv2d")
    m2, _, _ = make("conv2d", seed=3)
    a, b = LayerCollection.from_model(m1), LayerCollection.from_model(m2)
    assert a == b and hash(a) == hash(b)  # same architecture
    m3, _, _ = make("conv2d_nobias")
    assert a != LayerCollection.from_model(m3)
    assert a != a.sub_collection(["0"])


def test_get_layerid_module_maps_wrong_model():
    m1, _, _ = make("conv2d")
    lc = LayerCollection.from_model(m1)
    l_to_m, m_to_l = lc.get_layerid_module_maps(m1)
    assert l_to_m["0"] is m1[0] and m_to_l[m1[3]] == "3"
    with pytest.raises(ValueError, match="wrong model"):
        LayerCollection.from_model(make("linear_seq")[0]).get_layerid_module_maps(
            nn.Sequential(nn.Tanh())
        )


def test_add_layer_twice_refused():
    model, _, _ = make("linear")
    lc = LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="already in the collection"):
        lc.add_layer_from_model(model, model[0])


def test_nested_module_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
            self.head = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.head(self.inner(x))

    model = nn.Sequential(Block(), nn.Linear(2, 2)).double()
    lc = LayerCollection.from_model(model)
    assert list(lc.layers) == ["0.inner.0", "0.head", "1"]
    assert lc.p_pos == {"0.inner.0": 0, "0.head": 16, "1": 24}


# ------------------------------------------------------------------------------------------
# unsupported modules
def test_unsupported_module_named_in_error():
    model = nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3))
    with pytest.raises(UnsupportedLayerError) as e:
        LayerCollection.from_model(model)
    msg = str(e.value)
    assert "'1'" in msg and "PReLU" in msg and "ignore_unsupported_layers=True" in msg


def test_ignore_unsupported_layers():
    model = nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3))
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert list(lc.layers) == ["0", "2"]
    assert lc.numel() == 24 + 15


def test_grouped_conv_refused_with_reason():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError) as e:
        LayerCollection.from_model(model)
    assert "groups=2" in str(e.value) and "'0'" in str(e.value)


def test_embedding_max_norm_refused_with_reason():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(TypeError, match="max_norm"):
        LayerCollection.from_model(model)


def test_embedding_scale_grad_by_freq_refused_with_reason():
    """torch scales an Embedding's gradient by index counts over the whole batch: an
    example's gradient would depend on its batch mates."""
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True))
    with pytest.raises(TypeError, match="'0'.*scale_grad_by_freq"):
        LayerCollection.from_model(model)


def test_norm_without_affine_has_no_parameters_to_collect():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False), nn.LayerNorm(3, elementwise_affine=False))
    lc = LayerCollection.from_model(model)
    assert list(lc.layers) == ["0"]


# ------------------------------------------------------------------------------------------
# sub-collections
def subsets(name):
    """Two subsets of a model's layers: the first layer alone, and every other layer from
    the second (for two-layer models: the last layer alone)."""
    model, _, _ = make(name)
    names = list(LayerCollection.from_model(model).layers)
    return [(names[0],), tuple(names[1::2])]


SUB_CASES = [(n, s) for n in ALL for s in subsets(n)]
SUB_IDS = [f"{n}-{'+'.join(s)}" for n, s in SUB_CASES]


def test_sub_collection_structure():
    model, _, _ = make("mixed_cnn")
    lc = LayerCollection.from_model(model)
    sub = lc.sub_collection(["10", "0", "4"])  # order given does not matter
    assert list(sub.layers) == ["0", "4", "10"]
    assert sub.p_pos == {"0": 0, "4": lc.layers["0"].numel(), "10": lc.layers["0"].numel() + lc.layers["4"].numel()}
    assert sub.numel() == sum(lc.layers[n].numel() for n in ["0", "4", "10"])
    assert sub.layers["4"] == lc.layers["4"]
    with pytest.raises(KeyError, match="nope"):
        lc.sub_collection(["0", "nope"])


_SUB: dict = {}


def sub_case(name, names):
    key = (name, names)
    if key not in _SUB:
        model, batches, c = make(name)
        lc = LayerCollection.from_model(model).sub_collection(list(names))
        params = lc.parameters(model)
        variant = "classif_binary_logits" if c == 1 else "classif_logits"
        F = oracle.fim_dense(model, batches, variant, params=params)
        J = oracle.per_example_jacobian(model, None, batches, params=params)
        _SUB[key] = (model, batches, loader_of(batches), lc, variant, F, J)
    return _SUB[key]


@pm("name,names", SUB_CASES, ids=SUB_IDS)
def test_sub_collection_fims(name, names):
    model, batches, L, lc, variant, F, J = sub_case(name, names)
    assert F.shape == (lc.numel(), lc.numel())
    D = FIM(model, L, PMatDense, variant=variant, layer_collection=lc)
    assert D.layer_collection == lc
    assert rel(D.to_torch(), F) <= RTOL
    assert rel(FIM(model, L, PMatDiag, variant=variant, layer_collection=lc).get_diag(), torch.diagonal(F)) <= RTOL
    B = FIM(model, L, PMatBlockDiag, variant=variant, layer_collection=lc).to_torch()
    for ln, layer in lc.layers.items():
        s, e = lc.p_pos[ln], lc.p_pos[ln] + layer.numel()
        assert rel(B[s:e, s:e], F[s:e, s:e]) <= RTOL
    assert rel(FIM(model, L, PMatLowRank, variant=variant, layer_collection=lc).to_torch(), F) <= RTOL
    I = FIM(model, L, PMatImplicit, variant=variant, layer_collection=lc)
    g = torch.Generator().manual_seed(zlib.crc32(repr((name, names)).encode()))
    v = torch.randn(lc.numel(), generator=g, dtype=torch.float64)
    assert rel(I.vTMv(PVector(lc, vector_repr=v)), v @ F @ v) <= RTOL


@pm("name,names", SUB_CASES, ids=SUB_IDS)
def test_sub_collection_gram_and_jacobian(name, names):
    model, batches, L, lc, variant, F, J = sub_case(name, names)
    assert rel(Jacobian(model, L, layer_collection=lc).to_torch(), J) <= RTOL
    assert rel(GramMatrix(model, L, layer_collection=lc).to_torch(), torch.einsum("aik,bjk->aibj", J, J)) <= RTOL


def test_sub_collection_pvector_roundtrip():
    model, _, _ = make("groupnorm2d")
    lc = LayerCollection.from_model(model)
    sub = lc.sub_collection(["1", "4"])
    v = PVector.from_model(model, sub)
    want = torch.cat([p.detach().reshape(-1) for p in (model[1].weight, model[1].bias, model[4].weight, model[4].bias)])
    assert torch.equal(v.get_flat_representation(), want)
    (2 * v).copy_to_model(model)
    assert torch.equal(model[1].weight.detach(), 2 * want[:4])
    assert torch.equal(model[4].bias.detach(), 2 * want[-3:])
    assert torch.equal(model[0].weight, make("groupnorm2d")[0][0].weight)  # untouched
