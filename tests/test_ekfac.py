"""PMatEKFAC: equal to KFAC before update_diag; after it, the diagonal is the mean squared
per-example gradient in the Kronecker eigenbasis (checked against torch.func Jacobians),
at least as close to BlockDiag as KFAC; nngeometry 0.4 agrees on every operation it has.
"""
from __future__ import annotations

import pytest
import torch

import oracle
from models import MODELS, loader_of
from nngeo_dist import FIM
from nngeo_dist.generator import Generator
from nngeo_dist.generator.kfac import kfe_diag_statistics, kfac_statistics
from nngeo_dist.generator.layers import layer_math_for
from nngeo_dist.generator.variants import fim_root
from nngeo_dist.object import PMatBlockDiag, PMatEKFAC, PMatKFAC
from checks import block_mask, rel
from models import variant_of
from test_kfac import (  # noqa: F401 - f64 is a fixture
    KFAC_MODELS, NGEO_KFAC_MODELS, RTOL, check_against_dense, check_against_nngeometry, f64, nngeometry_fim,
    random_vector,
)


def build(name, **kw):
    model, batches, c = MODELS[name](**kw)
    loader = loader_of(batches)
    return model, batches, loader, variant_of(c)


# ------------------------------------------------------------------------------ nngeometry


@pytest.mark.parametrize("name", NGEO_KFAC_MODELS)
def test_matches_nngeometry_before_and_after_update(name, f64):
    model, batches, loader, variant = build(name)
    F = FIM(model, loader, PMatEKFAC, variant=variant)
    Fn = nngeometry_fim(model, loader, "PMatEKFAC", variant)
    assert rel(F.to_torch(), Fn.to_torch()) < RTOL
    F.update_diag(loader)
    Fn.update_diag(loader)
    check_against_nngeometry(F, Fn, reguls=(1e-4, 1e-1))
    M = Fn.to_torch()
    assert rel(F.pow(0.5, regul=1e-4).to_torch(), Fn.pow(0.5, regul=1e-4).to_torch()) < RTOL
    assert rel((3 * F).to_torch(), (3 * Fn).to_torch()) < RTOL
    # the reference has no get_diag for EKFAC; ours is the diagonal of the dense form
    with pytest.raises(NotImplementedError):
        Fn.get_diag(random_vector(F.layer_collection, 1))
    assert rel(F.get_diag(), torch.diagonal(M)) < RTOL


# ------------------------------------------------------------------------------ KFAC and BlockDiag


@pytest.mark.parametrize("name", KFAC_MODELS)
def test_equals_kfac_before_update_and_refits_from_jacobians(name):
    model, batches, loader, variant = build(name)
    E = FIM(model, loader, PMatEKFAC, variant=variant)
    K = FIM(model, loader, PMatKFAC, variant=variant)
    assert rel(E.to_torch(), K.to_torch()) < RTOL
    B = oracle.fim_dense(model, batches, variant) * block_mask(E.layer_collection)
    before = (K.to_torch() - B).norm()
    E.update_diag(loader)
    after = (E.to_torch() - B).norm()
    assert after <= before * (1 + 1e-12)
    # the re-fitted diagonal is diag(U^T B_l U) for each layer's eigenbasis U (oracle B)
    evecs, diags = E.data
    for n, kfe in E.get_KFE().items():
        s, m = E.layer_collection.p_pos[n], kfe.shape[0]
        ref = torch.diagonal(kfe.t() @ B[s:s + m, s:s + m] @ kfe)
        assert rel(diags[n].reshape(-1), ref) < RTOL
    check_against_dense(E, E.to_torch())


@pytest.mark.parametrize("name", ["conv2d", "linear_seq"])
def test_strictly_closer_to_blockdiag_when_kfac_is_not_exact(name):
    model, batches, loader, variant = build(name)
    B = FIM(model, loader, PMatBlockDiag, variant=variant).to_torch()
    K = FIM(model, loader, PMatKFAC, variant=variant).to_torch()
    E = FIM(model, loader, PMatEKFAC, variant=variant, update_diag=True).to_torch()
    assert (E - B).norm() < 0.99 * (K - B).norm()


def test_exact_with_one_example():
    model, batches, loader, variant = build("linear", n=1, batch_size=1)
    E = FIM(model, loader, PMatEKFAC, update_diag=True)
    B = FIM(model, loader, PMatBlockDiag)
    assert rel(E.to_torch(), B.to_torch()) < RTOL


# ------------------------------------------------------------------------------ operations


@pytest.mark.parametrize("name", ["linear", "conv1d", "embedding_padidx", "linear_seq"])
def test_operations(name):
    model, batches, loader, variant = build(name, n=30, batch_size=8)
    F = FIM(model, loader, PMatEKFAC, variant="regression", update_diag=True)
    M = F.to_torch()
    check_against_dense(F, M)
    v = random_vector(F.layer_collection, 2)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    regul = 1e-3
    assert rel(F.solve(v, regul=regul).to_torch(), torch.linalg.solve(M + regul * eye, v.to_torch())) < 1e-9
    assert rel(F.inverse(regul=regul).to_torch(), torch.linalg.inv(M + regul * eye)) < 1e-9
    assert rel(F.pow(-1, regul=regul).to_torch(), F.inverse(regul=regul).to_torch()) < 1e-8
    assert rel(F.solve(F.pow(1, regul=regul).mv(v), regul=regul).to_torch(), v.to_torch()) < 1e-8
    h = F.pow(0.5, regul=0).to_torch()
    assert rel(h @ h, M) < 1e-9
    # same eigenbasis: + - * stay EKFAC
    G = 2 * F
    assert rel((F + G).to_torch(), 3 * M) < RTOL
    assert rel((G - F).to_torch(), M) < RTOL
    # a KFE row per coefficient, orthonormal
    for kfe in F.get_KFE().values():
        assert rel(kfe @ kfe.t(), torch.eye(kfe.shape[0], dtype=kfe.dtype)) < 1e-12


def test_kfac_exact_damping_inverse_is_an_ekfac():
    model, batches, loader, variant = build("conv2d")
    K = FIM(model, loader, PMatKFAC)
    E = PMatEKFAC.from_kfac(K)
    v = random_vector(K.layer_collection, 3)
    assert rel(E.solve(v, regul=1e-2).to_torch(), K.solve(v, regul=1e-2, use_pi=False).to_torch()) < RTOL


def test_embedding_kfe_diag_without_one_hot_equals_dense_path():
    """From token ids, against the one-hot route built here: the per-example gradient of
    the table is sum_t g_t onehot(x_t)^T (the padding row gets none), rotated by evecs_g."""
    model, batches, loader, variant = build("embedding_padidx")
    mod = model[0]
    math = layer_math_for("Embedding")
    x = batches[0][0]
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, x.shape[0], x.shape[1], mod.embedding_dim, generator=g, dtype=torch.float64)
    ug = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    fast = math.kfe_diag(mod, x, grads, None, ug)
    onehot = torch.nn.functional.one_hot(x, mod.num_embeddings).double()
    onehot[..., mod.padding_idx] = 0
    per_example = torch.einsum("kntd,ntv->kndv", grads, onehot)  # (K, N, D, V)
    dense = torch.einsum("kndv,de->knev", per_example, ug).square().sum(dim=(0, 1))
    assert fast.shape == (mod.embedding_dim, mod.num_embeddings)
    assert rel(fast, dense) < RTOL
    assert fast[:, mod.padding_idx].abs().max() == 0


# ------------------------------------------------------------------------------ statistics


def test_two_halves_of_the_diagonal_statistics():
    model, batches, loader, variant = build("conv1d", n=11, batch_size=3)
    gen = Generator(model, fim_root(lambda *b: model(b[0]), "classif_logits"))
    whole = FIM(model, loader, PMatEKFAC, update_diag=True)
    E = PMatEKFAC.from_statistics(gen.layer_collection, kfac_statistics(gen, batches[:2]) + kfac_statistics(gen, batches[2:]), gen)
    assert rel(E.to_torch(), FIM(model, loader, PMatKFAC).to_torch()) < 1e-12
    evecs = E.data[0]
    s1, s2 = kfe_diag_statistics(gen, batches[:2], evecs), kfe_diag_statistics(gen, batches[2:], evecs)
    E.set_diag_from_statistics(s1 + s2)
    assert rel(E.to_torch(), whole.to_torch()) < 1e-10
    E.set_diag_from_statistics(s1)
    assert rel(E.to_torch(), whole.to_torch()) > 1e-3


def test_empty_loader_diagonal_statistics_shapes():
    model, batches, loader, variant = build("embedding")
    E = FIM(model, loader, PMatEKFAC)
    stats = E.diag_statistics([])
    assert stats.count == 0
    for n, l in E.layer_collection.layers.items():
        assert stats.sums[f"kfe/{n}"].shape == l.math.kfac_dims(l, n)
    with pytest.raises(ValueError, match="no example"):
        E.set_diag_from_statistics(stats)


# ------------------------------------------------------------------------------ bad input


def test_bad_input():
    model, batches, loader, variant = build("embedding_padidx")
    F = FIM(model, loader, PMatEKFAC)
    v = random_vector(F.layer_collection)
    with pytest.raises(ValueError, match="singular"):  # the padding row has no curvature
        F.solve(v, regul=0)
    with pytest.raises(ValueError, match="singular"):
        F.pow(-0.5, regul=0)
    with pytest.raises(ValueError, match="regul"):
        F.solve(v, regul=-1.0)
    assert torch.isfinite(F.solve(v, regul=1e-6).to_torch()).all()
    orphan = PMatEKFAC(F.layer_collection, *F.data)
    with pytest.raises(ValueError, match="generator"):
        orphan.update_diag(loader)
    other = FIM(model, loader_of(batches[:1]), PMatEKFAC)
    with pytest.raises(ValueError, match="eigenbases"):
        F + other
    with pytest.raises(TypeError):
        F + FIM(model, loader, PMatKFAC)


@pytest.mark.parametrize("name", ["conv2d", "linear", "embedding"])
def test_output_chunks_give_the_same_matrix(name):
    """Outputs back-propagated a few at a time (max_outputs): the input side is computed
    once per batch, the output side summed over chunks."""
    model, batches, loader, variant = build(name)
    ref = FIM(model, loader, PMatEKFAC, update_diag=True)
    chunked = FIM(model, loader, PMatEKFAC, update_diag=True, max_outputs=2)
    assert rel(chunked.to_torch(), ref.to_torch()) < RTOL


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "looped"])
@pytest.mark.parametrize("name", ["conv2d", "conv1d", "conv2d_stride_pad"])
def test_refit_from_held_outputs_in_example_chunks(name, vectorised, monkeypatch):
    """The diagonal's pass holds a chunk's output gradients (max_outputs=2) and walks the
    examples one at a time: still diag(U^T B_l U) of the oracle's blocks."""
    from nngeo_dist.generator import capture, layers

    model, batches, loader, variant = build(name)
    capture._BACKWARD_CHOICE[model] = vectorised
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", 1)
    E = FIM(model, loader, PMatEKFAC, variant=variant, max_outputs=2, update_diag=True)
    B = oracle.fim_dense(model, batches, variant) * block_mask(E.layer_collection)
    evecs, diags = E.data
    for n, kfe in E.get_KFE().items():
        s, m = E.layer_collection.p_pos[n], kfe.shape[0]
        assert rel(diags[n].reshape(-1), torch.diagonal(kfe.t() @ B[s:s + m, s:s + m] @ kfe)) < RTOL
