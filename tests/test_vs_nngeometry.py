"""Against the reference package, nngeometry 0.4 (DESIGN.md §1: "any result of this library
on the same model, data and representation agrees with it"), on every zoo model it
supports (models.NNGEOMETRY_SUPPORTED): same model, data and variant, float64, relative
error <= 1e-10.

nngeometry's classif_logits builds float tensors with the default dtype, so these tests run
with torch's default dtype set to float64 (restored afterwards). nngeometry leaves hooks on
a model after an error, so every test builds fresh models.
"""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn

from checks import rel
from models import NNGEOMETRY_SUPPORTED, loader_of, make

ng = pytest.importorskip("nngeometry")
from nngeometry import GramMatrix as NGGramMatrix  # noqa: E402
from nngeometry import Jacobian as NGJacobian  # noqa: E402
from nngeometry.layercollection import LayerCollection as NGLayerCollection  # noqa: E402
from nngeometry.metrics import FIM as NGFIM  # noqa: E402
from nngeometry.object import PMatBlockDiag as NGBlockDiag  # noqa: E402
from nngeometry.object import PMatDense as NGDense  # noqa: E402
from nngeometry.object import PMatDiag as NGDiag  # noqa: E402
from nngeometry.object import PMatImplicit as NGImplicit  # noqa: E402
from nngeometry.object import PMatLowRank as NGLowRank  # noqa: E402
from nngeometry.object import PVector as NGPVector  # noqa: E402

from nngeo_dist import FIM, GramMatrix, Jacobian  # noqa: E402
from nngeo_dist.object import (  # noqa: E402
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
    PVector,
)

RTOL = 1e-10
SUPPORTED = sorted(NNGEOMETRY_SUPPORTED)
pm = pytest.mark.parametrize


models = pm("name", SUPPORTED)


@pytest.fixture(autouse=True, scope="module")
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)




def default_variant(name):
    return "classif_binary_logits" if make(name)[2] == 1 else "classif_logits"


def fresh(name):
    """(our model, nngeometry's model, loader): two identical fresh copies, one each."""
    ours, batches, c = make(name)
    theirs, _, _ = make(name)
    return ours, theirs, loader_of(batches), c


def vector(name, d):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(d, generator=g, dtype=torch.float64)


def has_batchnorm(model):
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


# ------------------------------------------------------------------------------------------
def test_supported_models_listed():
    assert len(SUPPORTED) >= 10 and len(IMPLICIT_MV) >= 10
    assert {"linear", "conv2d", "convtranspose2d", "batchnorm2d", "groupnorm2d", "layernorm", "mixed_cnn"} <= set(SUPPORTED)


@models
@pm("variant", ["default", "regression"])
def test_dense(name, variant):
    variant = default_variant(name) if variant == "default" else variant
    ours, theirs, L, _ = fresh(name)
    a = FIM(ours, L, PMatDense, variant=variant).to_torch()
    b = NGFIM(theirs, L, NGDense, variant=variant).to_torch()
    assert a.shape == b.shape
    assert rel(a, b) <= RTOL


@models
def test_diag(name):
    ours, theirs, L, _ = fresh(name)
    v = default_variant(name)
    a = FIM(ours, L, PMatDiag, variant=v)
    b = NGFIM(theirs, L, NGDiag, variant=v)
    assert rel(a.get_diag(), b.get_diag()) <= RTOL
    assert rel(a.to_torch(), b.to_torch()) <= RTOL


@models
def test_blockdiag(name):
    ours, theirs, L, _ = fresh(name)
    v = default_variant(name)
    a = FIM(ours, L, PMatBlockDiag, variant=v).to_torch()
    b = NGFIM(theirs, L, NGBlockDiag, variant=v).to_torch()
    assert rel(a, b) <= RTOL


@models
def test_lowrank(name):
    ours, theirs, L, _ = fresh(name)
    v = default_variant(name)
    a = FIM(ours, L, PMatLowRank, variant=v)
    b = NGFIM(theirs, L, NGLowRank, variant=v)
    assert rel(a.to_torch(), b.to_torch()) <= RTOL
    assert rel(a.trace(), b.trace()) <= RTOL


@models
def test_implicit_trace(name):
    ours, theirs, L, _ = fresh(name)
    v = default_variant(name)
    a = FIM(ours, L, PMatImplicit, variant=v).trace()
    b = NGFIM(theirs, L, NGImplicit, variant=v).trace()
    assert rel(a, b) <= RTOL


# nngeometry 0.4 has no implicit mv/vTMv for BatchNorm layers (it raises NotImplementedError)
IMPLICIT_MV = [n for n in SUPPORTED if not has_batchnorm(make(n)[0])]


@pm("name", IMPLICIT_MV)
def test_implicit_vTMv_and_mv(name):
    ours, theirs, L, _ = fresh(name)
    v = default_variant(name)
    A = FIM(ours, L, PMatImplicit, variant=v)
    B = NGFIM(theirs, L, NGImplicit, variant=v)
    x = vector(name, A.layer_collection.numel())
    pa = PVector(A.layer_collection, vector_repr=x.clone())
    pb = NGPVector(NGLayerCollection.from_model(theirs), vector_repr=x.clone())
    assert rel(A.vTMv(pa), B.vTMv(pb)) <= RTOL
    assert rel(A.mv(pa).to_torch(), B.mv(pb).to_torch()) <= RTOL


@models
def test_gram_matrix(name):
    ours, theirs, L, _ = fresh(name)
    a = GramMatrix(ours, L).to_torch()
    b = NGGramMatrix(theirs, L).to_torch()
    assert a.shape == b.shape
    assert rel(a, b) <= RTOL


@models
def test_jacobian(name):
    ours, theirs, L, _ = fresh(name)
    a = Jacobian(ours, L).to_torch()
    b = NGJacobian(theirs, L).to_torch()
    assert a.shape == b.shape
    assert rel(a, b) <= RTOL


@pm("name", ["linear", "conv2d_stride_pad", "layernorm"])
def test_custom_function(name):
    """The same ``function(*batch)`` in both packages (covariance of its gradients)."""
    ours, theirs, L, _ = fresh(name)

    def make_fn(model):
        def fn(x, y):
            return -nn.functional.cross_entropy(model(x), y, reduction="none").unsqueeze(1)
        return fn

    a = FIM(ours, L, PMatDense, variant="regression", function=make_fn(ours)).to_torch()
    b = NGFIM(theirs, L, NGDense, variant="regression", function=make_fn(theirs)).to_torch()
    assert rel(a, b) <= RTOL
