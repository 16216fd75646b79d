"""PVector and FVector (DESIGN.md §2): flat and per-layer dict forms, arithmetic,
from_model / from_model_grad / copy_to_model / add_to_model, norm, dot; checked against
plain torch on the model's parameters (torch.cat([p.flatten() for p in
model.parameters()]) is the flat order for the zoo).
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as Fn

import oracle
from models import MODELS, make

from nngeo_dist import LayerCollection
from nngeo_dist.object import FVector, PVector, random_pvector

ALL = list(MODELS)
pm = pytest.mark.parametrize


models = pm("name", ALL)


def rand_like_flat(lc, name, k=0):
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{k}".encode()))
    return torch.randn(lc.numel(), generator=g, dtype=torch.float64)


def setup(name):
    model, batches, c = make(name)
    return model, batches, c, LayerCollection.from_model(model)


# ------------------------------------------------------------------------------------------
# construction and the two forms
@models
def test_from_model_flat_and_dict(name):
    model, _, _, lc = setup(name)
    v = PVector.from_model(model)
    assert v.layer_collection == lc
    flat = v.get_flat_representation()
    assert flat.shape == (lc.numel(),) and v.size() == torch.Size([lc.numel()])
    assert torch.equal(flat, oracle.flat_params(model))
    assert torch.equal(v.to_torch(), flat)
    d = v.get_dict_representation()
    mods = dict(model.named_modules())
    assert list(d) == list(lc.layers)
    for lname, tensors in d.items():
        mod = mods[lname]
        assert torch.equal(tensors[0], mod.weight.detach())
        if lc.layers[lname].has_bias:
            assert len(tensors) == 2 and torch.equal(tensors[1], mod.bias.detach())
        else:
            assert len(tensors) == 1
    # the model's parameters themselves (as nngeometry's): the vector follows the model,
    # a clone().detach() is a snapshot
    snapshot = v.clone().detach()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert torch.equal(v.get_flat_representation(), oracle.flat_params(model))
    assert not torch.equal(v.get_flat_representation(), flat)
    assert torch.equal(snapshot.get_flat_representation(), flat)


@models
def test_flat_dict_roundtrip(name):
    model, _, _, lc = setup(name)
    x = rand_like_flat(lc, name)
    v = PVector(lc, vector_repr=x)
    d = v.get_dict_representation()
    for lname, layer in lc.layers.items():
        s = lc.p_pos[lname]
        assert d[lname][0].shape == layer.weight_shape
        assert torch.equal(d[lname][0].reshape(-1), x[s : s + layer.weight_numel])
        if layer.has_bias:
            assert d[lname][1].shape == layer.bias_shape
            assert torch.equal(d[lname][1].reshape(-1), x[s + layer.weight_numel : s + layer.numel()])
        assert torch.equal(v.layer_flat(lname), x[s : s + layer.numel()])
    w = PVector(lc, dict_repr=d)
    assert torch.equal(w.get_flat_representation(), x)
    back = PVector.from_layer_flats(lc, {n: v.layer_flat(n) for n in lc.layers})
    assert torch.equal(back.get_flat_representation(), x)


def test_constructor_errors():
    model, _, _, lc = setup("linear")
    with pytest.raises(ValueError, match="exactly one"):
        PVector(lc)
    with pytest.raises(ValueError, match="exactly one"):
        PVector(lc, vector_repr=torch.zeros(lc.numel()), dict_repr=PVector.from_model(model).to_dict())
    with pytest.raises(ValueError, match=f"d={lc.numel()}"):
        PVector(lc, vector_repr=torch.zeros(lc.numel() + 1))
    with pytest.raises(ValueError, match=r"\(c, n\), or flat \(c n,\)"):
        FVector(torch.zeros(2, 5, 1))  # a flat (c n,) one is nngeometry 0.4's, accepted


# ------------------------------------------------------------------------------------------
# model <-> vector
@models
def test_from_model_grad(name):
    model, batches, _, lc = setup(name)
    x, y = batches[0]
    out = model(x)
    loss = Fn.cross_entropy(out, y) if out.shape[1] > 1 else out.pow(2).mean()
    loss.backward()
    v = PVector.from_model_grad(model)
    want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(v.get_flat_representation(), want)
    # independent: autograd.grad on fresh graph
    model.zero_grad()
    out = model(x)
    loss = Fn.cross_entropy(out, y) if out.shape[1] > 1 else out.pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(v.get_flat_representation(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=0)


def test_from_model_grad_without_backward():
    model, _, _, _ = setup("linear")
    with pytest.raises(ValueError, match="backward"):
        PVector.from_model_grad(model)


@models
def test_copy_to_model_and_add_to_model(name):
    model, _, _, lc = setup(name)
    w0 = oracle.flat_params(model)
    x = rand_like_flat(lc, name)
    PVector(lc, vector_repr=x).copy_to_model(model)
    assert torch.equal(oracle.flat_params(model), x)
    step = rand_like_flat(lc, name, 1)
    PVector(lc, vector_repr=step).add_to_model(model)
    assert torch.allclose(oracle.flat_params(model), x + step, rtol=0, atol=1e-15)
    # round trip to the original parameters through the dict form
    PVector(lc, vector_repr=w0).get_dict_representation()
    PVector(lc, dict_repr=PVector(lc, vector_repr=w0).get_dict_representation()).copy_to_model(model)
    assert torch.equal(oracle.flat_params(model), w0)


def test_add_to_model_changes_outputs_like_a_parameter_step():
    model, batches, _, lc = setup("conv2d_stride_pad")
    x = batches[0][0]
    step = 1e-3 * rand_like_flat(lc, "step")
    ref_model, _, _ = make("conv2d_stride_pad")
    oracle.set_flat_params(ref_model, oracle.flat_params(ref_model) + step)
    PVector(lc, vector_repr=step).add_to_model(model)
    assert torch.equal(model(x), ref_model(x))


# ------------------------------------------------------------------------------------------
# algebra
@pm("name", ["linear", "conv1d", "embedding", "mixed_cnn"])
def test_arithmetic(name):
    model, _, _, lc = setup(name)
    a, b = rand_like_flat(lc, name, 0), rand_like_flat(lc, name, 1)
    va, vb = PVector(lc, vector_repr=a.clone()), PVector(lc, dict_repr=PVector(lc, vector_repr=b.clone()).to_dict())
    assert torch.equal((va + vb).to_torch(), a + b)
    assert torch.equal((va - vb).to_torch(), a - b)
    assert torch.equal((-va).to_torch(), -a)
    assert torch.equal((2.5 * va).to_torch(), 2.5 * a)
    assert torch.equal((va * 2.5).to_torch(), 2.5 * a)
    assert torch.equal((va / 4).to_torch(), a / 4)
    assert torch.equal((va**2).to_torch(), a**2)
    assert torch.allclose(va.dot(vb), a @ b, rtol=1e-14, atol=0)
    assert torch.allclose(va.norm(), a.norm(), rtol=1e-14, atol=0)
    assert torch.allclose(va.norm(1), a.abs().sum(), rtol=1e-14, atol=0)
    for r in (va + vb, 2.5 * va, va - vb):
        assert r.layer_collection == lc
    # inputs untouched
    assert torch.equal(va.to_torch(), a) and torch.equal(vb.to_torch(), b)


def test_clone_and_detach():
    model, _, _, lc = setup("layernorm")
    v = PVector(lc, vector_repr=rand_like_flat(lc, "c").requires_grad_(True))
    c = v.clone()
    assert torch.equal(c.to_torch(), v.to_torch())
    with torch.no_grad():
        c.to_torch().add_(1.0)
    assert not torch.equal(c.to_torch(), v.to_torch())
    d = v.detach()
    assert not d.to_torch().requires_grad
    assert torch.equal(d.to_torch(), v.to_torch())


REPS_FOR_EWC = ["PMatDense", "PMatDiag", "PMatBlockDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag",
                "PMatLowRank", "PMatImplicit"]


@pytest.mark.parametrize("rep", REPS_FOR_EWC)
def test_ewc_penalty_backpropagates_into_the_model(rep):
    """The paper's EWC penalty F.vTMv(w - w_a), w = PVector.from_model(model): its gradient
    w.r.t. the model's parameters is 2 M (w - w_a), M the matrix the representation holds
    (for the implicit one, the dense oracle at the model's current parameters)."""
    import nngeo_dist.object as O
    from nngeo_dist import FIM

    model, batches, _, lc = setup("linear")
    F = FIM(model, batches, getattr(O, rep))
    w_a = PVector.from_model(model).clone().detach()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    # an implicit matrix is the model's as it is now; the others were computed before
    M = (F.to_torch() if rep != "PMatImplicit" else oracle.fim_dense(model, batches)).detach()
    model.zero_grad()
    penalty = F.vTMv(PVector.from_model(model) - w_a)
    penalty.backward()
    step = (oracle.flat_params(model) - w_a.to_torch()).detach()
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(penalty.detach(), step @ M @ step, rtol=1e-10, atol=0)
    assert (got - 2 * M @ step).norm() <= 1e-10 * (2 * M @ step).norm()


def test_random_pvector():
    model, _, _, lc = setup("conv2d")
    g = torch.Generator().manual_seed(0)
    v = random_pvector(lc, dtype=torch.float64, generator=g)
    assert v.to_torch().shape == (lc.numel(),) and v.to_torch().dtype == torch.float64
    w = random_pvector(lc, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(v.to_torch(), w.to_torch())


def test_vectors_from_different_collections_refused():
    m1, _, _, lc1 = setup("linear")
    m2, _, _, lc2 = setup("conv1d")
    a, b = PVector.from_model(m1), PVector.from_model(m2)
    for op in (lambda: a + b, lambda: a - b, lambda: a.dot(b)):
        with pytest.raises(ValueError, match="different LayerCollections"):
            op()
    # a sub-collection is another space too
    sub = PVector.from_model(m1, lc1.sub_collection(["0"]))
    with pytest.raises(ValueError, match="different LayerCollections"):
        a + sub


# ------------------------------------------------------------------------------------------
# FVector
def test_fvector():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 7, generator=g, dtype=torch.float64)
    b = torch.randn(3, 7, generator=g, dtype=torch.float64)
    fa, fb = FVector(a.clone()), FVector(b.clone())
    assert fa.size() == (3, 7)
    assert torch.equal(fa.to_torch(), a) and torch.equal(fa.get_flat_representation(), a)
    assert torch.equal((fa + fb).to_torch(), a + b)
    assert torch.equal((fa - fb).to_torch(), a - b)
    assert torch.equal((3.0 * fa).to_torch(), 3 * a)
    assert torch.equal((fa * 3.0).to_torch(), 3 * a)
    assert torch.allclose(fa.dot(fb), (a * b).sum(), rtol=1e-14, atol=0)
    assert torch.allclose(fa.norm(), a.norm(), rtol=1e-14, atol=0)
