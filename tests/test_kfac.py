"""PMatKFAC: against nngeometry 0.4, against torch.func oracles where KFAC is exact, and
against its own dense form (every operation), plus statistics, numerics and bad input.

nngeometry splits the Kronecker product's scale differently between the factors (its
classif_logits root has c-1 outputs, ours c), so factors are never compared raw: only
products and operations, which do not depend on the split.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import oracle
from models import MODELS, NNGEOMETRY_SUPPORTED, loader_of, variant_of
from nngeo_dist import FIM, LayerCollection
from nngeo_dist.generator import Generator
from nngeo_dist.generator.kfac import kfac_statistics
from nngeo_dist.generator.variants import fim_root
from nngeo_dist.object import PMatBlockDiag, PMatDense, PMatEKFAC, PMatKFAC, PVector
from checks import block_mask, default_dtype, rel

RTOL = 1e-10

KFAC_MODELS = [
    "linear", "linear_nobias", "linear_binary", "linear_seq", "conv1d", "conv2d",
    "conv2d_stride_pad", "conv2d_dilation", "conv2d_nobias", "embedding", "embedding_padidx",
]
NGEO_KFAC_MODELS = [m for m in KFAC_MODELS if m in NNGEOMETRY_SUPPORTED]
NOT_FACTORABLE = ["batchnorm1d", "batchnorm2d", "groupnorm2d", "layernorm", "rmsnorm", "convtranspose2d"]


# ------------------------------------------------------------------------------ helpers


def nngeometry_fim(model, loader, representation_name, variant):
    """nngeometry 0.4's FIM in float64 (its helpers allocate in the default dtype)."""
    pytest.importorskip("nngeometry")
    import nngeometry.metrics as nm
    import nngeometry.object as no

    with default_dtype(torch.float64):
        return nm.FIM(model=model, loader=loader, representation=getattr(no, representation_name), variant=variant)


@pytest.fixture
def f64():
    """nngeometry's operations allocate in the default dtype: float64 for the test."""
    with default_dtype(torch.float64):
        yield


def ngeo_vector(F_ngeo, x: torch.Tensor):
    from nngeometry.object import PVector as NPVector

    return NPVector(layer_collection=F_ngeo.generator.layer_collection, vector_repr=x)


def random_vector(lc, seed=0, dtype=torch.float64) -> PVector:
    g = torch.Generator().manual_seed(seed)
    return PVector(lc, vector_repr=torch.randn(lc.numel(), generator=g, dtype=dtype))


def check_against_dense(F, M, regul=1e-3, seed=0, use_pi=None):
    """Every operation of F against the dense matrix M that F claims to be."""
    lc = F.layer_collection
    v = random_vector(lc, seed)
    x = v.to_torch()
    assert rel(F.mv(v).to_torch(), M @ x) < RTOL
    assert rel(F.vTMv(v), x @ M @ x) < RTOL
    assert rel(F.trace(), torch.trace(M)) < RTOL
    assert rel(F.frobenius_norm(), torch.linalg.matrix_norm(M)) < RTOL
    assert rel(F.get_diag(), torch.diagonal(M)) < RTOL
    assert F.size() == M.shape


def check_against_nngeometry(F, Fn, reguls=(1e-3, 1e-1), inverse=True):
    """The operations both packages have: ours on F against nngeometry's on Fn, for the
    same random vector (solve and inverse, with damping, at 1e-9)."""
    assert rel(F.to_torch(), Fn.to_torch()) < RTOL
    assert rel(F.trace(), Fn.trace()) < RTOL
    assert rel(F.frobenius_norm(), Fn.frobenius_norm()) < RTOL
    v = random_vector(F.layer_collection, 1)
    vn = ngeo_vector(Fn, v.to_torch())
    assert rel(F.mv(v).to_torch(), Fn.mv(vn).to_torch()) < RTOL
    assert rel(F.vTMv(v), Fn.vTMv(vn)) < RTOL
    for regul in reguls:
        assert rel(F.solve(v, regul=regul).to_torch(), Fn.solvePVec(vn, regul=regul).to_torch()) < 1e-9
        if inverse:
            assert rel(F.inverse(regul=regul).to_torch(), Fn.inverse(regul=regul).to_torch()) < 1e-9


def layers(model):
    return LayerCollection.from_model(model)


# ------------------------------------------------------------------------------ nngeometry


@pytest.mark.parametrize("name", NGEO_KFAC_MODELS + ["linear@regression", "conv2d@regression"])
def test_matches_nngeometry(name, f64):
    name, _, variant = name.partition("@")
    model, batches, c = MODELS[name]()
    variant = variant or variant_of(c)
    loader = loader_of(batches)
    F = FIM(model, loader, PMatKFAC, variant=variant)
    Fn = nngeometry_fim(model, loader, "PMatKFAC", variant)
    check_against_nngeometry(F, Fn)
    assert rel(F.get_diag(), Fn.get_diag()) < RTOL
    assert rel(F.pow(2, regul=1e-4).to_torch(), Fn.pow(2, regul=1e-4).to_torch()) < RTOL
    assert rel(F.pow(-2, regul=1e-2).to_torch(), Fn.pow(-2, regul=1e-2).to_torch()) < 1e-9
    # the same eigenvalues (KFAC's factors are decomposed by both)
    Fn.compute_eigendecomposition()
    ev, _ = F.get_eigendecomposition()
    evn, _ = Fn.get_eigendecomposition()
    for n in ev:
        ours = torch.outer(ev[n][1], ev[n][0]).flatten().sort().values
        ref = torch.outer(evn[n][1], evn[n][0]).flatten().sort().values
        assert rel(ours, ref) < RTOL


# ------------------------------------------------------------------------------ oracles


class _Pool1d(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def exact_models():
    """Models on which KFAC is exact with one example: every layer sees one position."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    out = {}
    out["mlp"] = (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False), nn.Tanh(), nn.Linear(3, 3)).double(),
        torch.randn(1, 4, generator=g, dtype=torch.float64),
    )
    out["conv_1x1_maps"] = (
        nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 1, bias=False), nn.Flatten(), nn.Linear(4, 3)).double(),
        torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64),
    )
    out["conv1d_len1"] = (
        nn.Sequential(nn.Conv1d(2, 3, 4), nn.Tanh(), _Pool1d(), nn.Linear(3, 3)).double(),
        torch.randn(1, 2, 4, generator=g, dtype=torch.float64),
    )
    out["embedding_1token"] = (
        nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4)).double(),
        torch.tensor([[2]]),
    )
    return out


@pytest.mark.parametrize("name", list(exact_models()))
def test_exact_with_one_example(name):
    """One example per layer input at one position: A (x) G is the layer's block."""
    model, x = exact_models()[name]
    batches = [(x, torch.zeros(1, dtype=torch.long))]
    loader = loader_of(batches)
    F = FIM(model, loader, PMatKFAC)
    lc = F.layer_collection
    ref = oracle.fim_dense(model, batches, "classif_logits") * block_mask(lc)
    assert ref.abs().sum() > 0
    assert rel(F.to_torch(), ref) < RTOL
    assert rel(F.to_torch(), FIM(model, loader, PMatBlockDiag).to_torch()) < RTOL
    check_against_dense(F, ref)


def test_not_exact_with_two_examples():
    """The exactness test above could not pass by accident: two examples break it."""
    model, x = exact_models()["mlp"]
    batches = [(torch.cat([x, 2 * x.flip(1)]), torch.zeros(2, dtype=torch.long))]
    F = FIM(model, loader_of(batches), PMatKFAC)
    ref = oracle.fim_dense(model, batches, "classif_logits") * block_mask(F.layer_collection)
    assert rel(F.to_torch(), ref) > 1e-3


def _factors_by_hand(model, batches, layer, variant="regression"):
    """A and G of one Linear layer from a forward hook and autograd through a zero
    perturbation of its output (independent of the library's capture and kernels)."""
    A, G, n = 0, 0, 0
    for x, _ in batches:
        store = {}

        def hook(mod, inp, out):
            store["a"] = inp[0].detach()
            store["delta"] = torch.zeros_like(out, requires_grad=True)
            return out + store["delta"]

        h = layer.register_forward_hook(hook)
        f = model(x)
        h.remove()
        a, delta = store["a"], store["delta"]
        a1 = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1).reshape(-1, a.shape[-1] + 1)
        A = A + a1.t() @ a1
        T = a.reshape(a.shape[0], -1, a.shape[-1]).shape[1]
        for k in range(f.shape[1]):
            gk = torch.autograd.grad(f[:, k].sum(), delta, retain_graph=True)[0].reshape(-1, delta.shape[-1])
            G = G + gk.t() @ gk / T
        n += x.shape[0]
    return A / n, G / n


def test_linear_on_sequences_factors_by_hand():
    model, batches, c = MODELS["linear_seq"]()
    F = FIM(model, loader_of(batches), PMatKFAC, variant="regression")
    for name in ["0", "3"]:
        A, G = _factors_by_hand(model, batches, dict(model.named_modules())[name])
        a, g = F.data[name]
        assert rel(torch.kron(g, a), torch.kron(G, A)) < RTOL


@pytest.mark.parametrize("name", KFAC_MODELS)
def test_operations_against_dense_form(name):
    model, batches, c = MODELS[name]()
    F = FIM(model, loader_of(batches), PMatKFAC, variant=variant_of(c))
    M = F.to_torch()
    assert torch.allclose(M, M.t(), rtol=0, atol=1e-14 * M.abs().max())
    assert (M * ~block_mask(F.layer_collection)).abs().max() == 0
    check_against_dense(F, M)
    # exact damping: (A (x) G + r I)^{-1}, solve, inverse and pow
    v = random_vector(F.layer_collection, 2)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    for regul in (1e-4, 1e-1):
        ref = torch.linalg.solve(M + regul * eye, v.to_torch())
        assert rel(F.solve(v, regul=regul, use_pi=False).to_torch(), ref) < 1e-9
        inv = F.inverse(regul=regul, use_pi=False)
        assert isinstance(inv, PMatEKFAC)
        assert rel(inv.to_torch(), torch.linalg.inv(M + regul * eye)) < 1e-9
    # real powers: a square root squares back, in both modes
    h = F.pow(0.5, regul=0, use_pi=False).to_torch()
    assert rel(h @ h, M) < 1e-9
    h = F.pow(0.5, regul=1e-3).to_torch()
    assert rel(h @ h, F.pow(1, regul=1e-3).to_torch()) < 1e-9
    # pow(-1) = inverse, solve(pow(1)'s mv) = identity, for both dampings
    for use_pi in (True, False):
        regul = 1e-3
        assert rel(F.pow(-1, regul=regul, use_pi=use_pi).to_torch(), F.inverse(regul=regul, use_pi=use_pi).to_torch()) < 1e-8
        damped = F.pow(1, regul=regul, use_pi=use_pi)
        assert rel(F.solve(damped.mv(v), regul=regul, use_pi=use_pi).to_torch(), v.to_torch()) < 1e-8


@pytest.mark.parametrize("name", ["linear", "conv2d_stride_pad", "conv1d", "linear_seq"])
def test_solve_mv_roundtrip_regression(name):
    """Regression variant: every factor is invertible, so regul=0 is allowed and
    solve(mv(x)) = x exactly."""
    model, batches, c = MODELS[name](n=40, batch_size=16)
    F = FIM(model, loader_of(batches), PMatKFAC, variant="regression")
    v = random_vector(F.layer_collection, 3)
    for use_pi in (True, False):
        assert rel(F.solve(F.mv(v), regul=0, use_pi=use_pi).to_torch(), v.to_torch()) < 1e-8
    assert rel(F.inverse(regul=0).to_torch() @ F.to_torch(), torch.eye(F.size(0), dtype=torch.float64)) < 1e-8


def test_pi_heuristic_splits_the_damping():
    model, batches, c = MODELS["linear"]()
    F = FIM(model, loader_of(batches), PMatKFAC)
    regul = 0.3
    v = random_vector(F.layer_collection, 4)
    blocks = []
    for n, (a, g) in F.data.items():
        pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
        ad = a + pi * regul ** 0.5 * torch.eye(a.shape[0], dtype=a.dtype)
        gd = g + regul ** 0.5 / pi * torch.eye(g.shape[0], dtype=g.dtype)
        blocks.append((n, ad, gd))
    damped = PMatKFAC(F.layer_collection, {n: (a, g) for n, a, g in blocks})
    assert rel(F.solve(damped.mv(v), regul=regul).to_torch(), v.to_torch()) < 1e-10
    # and that differs from the exact damping
    assert rel(F.solve(v, regul=regul).to_torch(), F.solve(v, regul=regul, use_pi=False).to_torch()) > 1e-3


# ------------------------------------------------------------------------------ statistics


def test_statistics_of_an_empty_loader_have_the_right_shapes():
    model, batches, c = MODELS["embedding"]()
    lin = MODELS["conv2d"]()[0]
    for m in (model, lin):
        gen = Generator(m, fim_root(lambda *b: m(b[0]), "classif_logits"))
        stats = kfac_statistics(gen, [])
        assert stats.count == 0
        for n, l in gen.layer_collection.layers.items():
            o, i = l.math.kfac_dims(l, n)
            A, G = stats.sums[f"A/{n}"], stats.sums[f"G/{n}"]
            assert G.shape == (o, o) and f"G/{n}" in stats.symmetric
            if l.kind == "Embedding":
                assert A.shape == (l.weight_shape[0],) and f"A/{n}" not in stats.symmetric
            else:
                assert A.shape == (i, i) and f"A/{n}" in stats.symmetric
            assert A.abs().sum() == 0 and G.abs().sum() == 0
        with pytest.raises(ValueError, match="no example"):
            PMatKFAC.from_statistics(gen.layer_collection, stats, gen)


@pytest.mark.parametrize("name", ["conv1d", "embedding_padidx"])
def test_two_halves_add_up_to_the_whole(name):
    model, batches, c = MODELS[name](n=11, batch_size=3)
    gen = Generator(model, fim_root(lambda *b: model(b[0]), "classif_logits"))
    s1 = kfac_statistics(gen, batches[:2])
    s2 = kfac_statistics(gen, batches[2:])
    assert s1.count == 6 and s2.count == 5
    whole = FIM(model, loader_of(batches), PMatKFAC)
    halves = PMatKFAC.from_statistics(gen.layer_collection, s1 + s2, gen)
    assert rel(halves.to_torch(), whole.to_torch()) < 1e-12
    # and a half alone is not the whole (the check can fail)
    assert rel(PMatKFAC.from_statistics(gen.layer_collection, s1, gen).to_torch(), whole.to_torch()) > 1e-3


# ------------------------------------------------------------------------------ numerics


def _rank_deficient_kfac():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(2, 7, generator=g, dtype=torch.float64), torch.zeros(2, dtype=torch.long))]
    return model, batches


def test_eigenvalues_clipped_and_singular_factors_refused():
    model, batches = _rank_deficient_kfac()  # A of layer 0 (8x8) has rank <= 2
    F = FIM(model, loader_of(batches), PMatKFAC)
    a, g = F.data["0"]
    raw = torch.linalg.eigvalsh(a)
    evals, evecs = F.get_eigendecomposition()
    la, ua = evals["0"][0], evecs["0"][0]
    assert (la >= 0).all()
    assert rel((ua * la) @ ua.t(), a) < 1e-12
    assert (raw < 0).any()  # round-off negatives exist, and were clipped
    v = random_vector(F.layer_collection)
    for use_pi in (True, False):
        with pytest.raises(ValueError, match="singular"):
            F.solve(v, regul=0, use_pi=use_pi)
        with pytest.raises(ValueError, match="singular"):
            F.pow(-0.5, regul=0, use_pi=use_pi)
        with pytest.raises(ValueError, match="regul"):
            F.solve(v, regul=-1e-3, use_pi=use_pi)
        out = F.solve(v, regul=1e-6, use_pi=use_pi).to_torch()
        assert torch.isfinite(out).all()
    assert torch.isfinite(F.pow(0.5, regul=0).to_torch()).all()


def test_symmetrised_before_eigendecomposition():
    model, batches, _ = MODELS["linear"]()
    F = FIM(model, loader_of(batches), PMatKFAC)
    up = {n: 1e-3 * torch.triu(torch.ones_like(a), 1) for n, (a, g) in F.data.items()}
    skew = {n: (a + up[n] - up[n].t(), g) for n, (a, g) in F.data.items()}  # same symmetric part
    G = PMatKFAC(F.layer_collection, skew)
    evals, evecs = G.get_eigendecomposition()
    for n, (a, _) in F.data.items():
        la, ua = evals[n][0], evecs[n][0]
        assert rel((ua * la) @ ua.t(), a) < 1e-12


def test_eig_dtype_float64_for_float32_factors():
    model, batches, c = MODELS["conv2d"]()
    loader = loader_of(batches)
    F64 = FIM(model, loader, PMatKFAC)
    model32 = model.float()
    loader32 = loader_of([(x.float(), y) for x, y in batches])
    F32 = FIM(model32, loader32, PMatKFAC, eig_dtype=torch.float64)
    assert F32.eig_dtype == torch.float64
    evals, evecs = F32.get_eigendecomposition()
    assert all(u.dtype == torch.float32 for ua, ug in evecs.values() for u in (ua, ug))
    v = random_vector(F64.layer_collection, 6)
    ref = F64.solve(v, regul=1e-2, use_pi=False).to_torch()
    out = F32.solve(PVector(F32.layer_collection, vector_repr=v.to_torch().float()), regul=1e-2, use_pi=False).to_torch()
    assert out.dtype == torch.float32
    assert rel(out.double(), ref) < 1e-4


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", NOT_FACTORABLE)
def test_unfactorable_layer_names_it_and_suggests_mixed(name):
    model, batches, c = MODELS[name]()
    bad = next((n, l) for n, l in LayerCollection.from_model(model).layers.items() if l.kind not in ("Linear", "Conv1d", "Conv2d"))

    class Explodes:
        def __iter__(self):
            raise AssertionError("the data was read before the layers were checked")

        def __len__(self):
            return 1

    with pytest.raises(TypeError, match=f"'{bad[0]}' \\({bad[1].kind}\\).*representation=\\{{"):
        FIM(model, Explodes(), PMatKFAC)
    with pytest.raises(NotImplementedError):
        FIM(model, Explodes(), PMatKFAC)


def test_bad_vectors_and_operations():
    model, batches, c = MODELS["linear"]()
    F = FIM(model, loader_of(batches), PMatKFAC)
    other = LayerCollection.from_model(MODELS["linear_nobias"]()[0])
    with pytest.raises(ValueError, match="LayerCollection"):
        F.mv(random_vector(other))
    with pytest.raises(TypeError, match="PVector"):
        F.mv(torch.zeros(F.size(0)))
    with pytest.raises(NotImplementedError, match="PMatBlockDiag"):
        F + F
    with pytest.raises(NotImplementedError):
        F - F
    assert rel((2.5 * F).to_torch(), 2.5 * F.to_torch()) < 1e-14
    assert rel((F * 2.5).to_torch(), 2.5 * F.to_torch()) < 1e-14
    # a negative multiple would have factors whose eigenvalues solve/pow clip at 0: refused,
    # and the EKFAC it points to solves it exactly
    with pytest.raises(ValueError, match=r"scaled by x >= 0, not -1.0.*PMatEKFAC"):
        -1 * F
    E = -1.0 * PMatEKFAC.from_kfac(F)
    M = E.to_torch()
    assert rel(M, -F.to_torch()) < 1e-12
    regul = 2 * float(torch.linalg.eigvalsh(F.to_torch()).max())  # M + regul I invertible
    v = random_vector(F.layer_collection)
    want = torch.linalg.solve(M + regul * torch.eye(M.shape[0], dtype=M.dtype), v.to_torch())
    assert rel(E.solve(v, regul=regul).to_torch(), want) < 1e-10
    assert rel(F.mm(F).to_torch(), F.to_torch() @ F.to_torch()) < RTOL
    with pytest.raises(TypeError):
        F.mm(FIM(model, loader_of(batches), PMatBlockDiag))


def test_works_on_a_sub_collection():
    model, batches, c = MODELS["mixed_cnn"]()
    lc = LayerCollection.from_model(model)
    sub = lc.sub_collection([n for n, l in lc.layers.items() if l.kind in ("Linear", "Conv2d")])
    F = FIM(model, loader_of(batches), PMatKFAC, layer_collection=sub)
    D = FIM(model, loader_of(batches), PMatDense, layer_collection=sub).to_torch()
    assert F.size(0) == sub.numel()
    check_against_dense(F, F.to_torch())
    # the diagonal of a KFAC block is not the true diagonal, but it is close in trace scale
    assert 0.1 < (F.trace() / torch.trace(D)).item() < 10


def test_output_chunks_give_the_same_factors():
    model, batches, c = MODELS["conv2d_stride_pad"]()
    ref = FIM(model, loader_of(batches), PMatKFAC)
    chunked = FIM(model, loader_of(batches), PMatKFAC, max_outputs=3)
    for n, (a, g) in ref.data.items():
        assert rel(chunked.data[n][0], a) < RTOL and rel(chunked.data[n][1], g) < RTOL
