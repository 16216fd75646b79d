"""PMatQuasiDiag: the FIM restricted to its diagonal and its weight/bias interactions
per output unit; against the torch.func oracle on every model of the zoo, against
nngeometry 0.4, and every operation (solve in closed form) against its dense form.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import oracle
from models import MODELS, loader_of
from nngeo_dist import FIM
from nngeo_dist.generator import Generator
from nngeo_dist.generator.kfac import quasidiag_statistics
from nngeo_dist.generator.variants import fim_root
from nngeo_dist.object import PMatDiag, PMatQuasiDiag
from checks import rel
from models import variant_of
from test_kfac import (  # noqa: F401 - f64 is a fixture
    RTOL, check_against_dense, check_against_nngeometry, f64, nngeometry_fim, random_vector,
)

NGEO_QD_MODELS = ["linear", "linear_nobias", "conv2d", "conv2d_stride_pad", "conv2d_dilation", "conv2d_nobias"]


def pattern(model) -> torch.Tensor:
    """(d, d) True on the diagonal and between each weight coefficient and the bias
    coefficient of its output unit, derived from the modules' parameter shapes alone."""
    blocks = []
    for mod in model.modules():
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if not isinstance(w, nn.Parameter):
            continue
        nw, nb = w.numel(), 0 if b is None else b.numel()
        m = torch.eye(nw + nb, dtype=torch.bool)
        if b is not None:
            idx = torch.arange(nw)
            if isinstance(mod, nn.ConvTranspose2d):  # weight (in, out, kh, kw)
                owner = (idx // (w.shape[2] * w.shape[3])) % w.shape[1]
            else:  # weight (out, ...) or shaped like the bias
                owner = idx // (nw // nb)
            m[idx, nw + owner] = True
            m[nw + owner, idx] = True
        blocks.append(m)
    return torch.block_diag(*[b.double() for b in blocks]).bool()


@pytest.mark.parametrize("name", list(MODELS))
def test_equals_the_oracle_on_its_pattern(name):
    model, batches, c = MODELS[name]()
    variant = variant_of(c)
    F = FIM(model, loader_of(batches), PMatQuasiDiag, variant=variant)
    P = pattern(model)
    ref = oracle.fim_dense(model, batches, variant) * P
    M = F.to_torch()
    assert rel(M, ref) < RTOL
    assert (M * ~P).abs().max() == 0
    check_against_dense(F, M)
    assert rel(F.get_diag(), FIM(model, loader_of(batches), PMatDiag, variant=variant).get_diag()) < RTOL


@pytest.mark.parametrize("name", NGEO_QD_MODELS)
def test_matches_nngeometry(name, f64):
    model, batches, c = MODELS[name]()
    variant = variant_of(c)
    loader = loader_of(batches)
    F = FIM(model, loader, PMatQuasiDiag, variant=variant)
    Fn = nngeometry_fim(model, loader, "PMatQuasiDiag", variant)
    check_against_nngeometry(F, Fn, inverse=False)
    assert rel(F.get_diag(), Fn.get_diag()) < RTOL


@pytest.mark.parametrize("name", ["linear", "conv2d_stride_pad", "layernorm_2d", "convtranspose2d", "embedding"])
def test_solve_in_closed_form(name):
    model, batches, c = MODELS[name](n=20, batch_size=8)
    F = FIM(model, loader_of(batches), PMatQuasiDiag, variant="regression")
    M = F.to_torch()
    v = random_vector(F.layer_collection, 2)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    for regul in (1e-4, 1e-1):
        ref = torch.linalg.solve(M + regul * eye, v.to_torch())
        assert rel(F.solve(v, regul=regul).to_torch(), ref) < 1e-9
        assert rel(F.solve(F.mv(v) + regul * v, regul=regul).to_torch(), v.to_torch()) < 1e-8


def test_linear_algebra_and_bad_input():
    model, batches, c = MODELS["embedding_padidx"]()
    F = FIM(model, loader_of(batches), PMatQuasiDiag)
    M = F.to_torch()
    assert rel((F + 2 * F).to_torch(), 3 * M) < RTOL
    assert rel((F * 2 - F).to_torch(), M) < RTOL
    v = random_vector(F.layer_collection)
    with pytest.raises(ValueError, match="singular"):  # the padding row: zero diagonal
        F.solve(v, regul=0)
    with pytest.raises(ValueError, match="regul"):
        F.solve(v, regul=-1.0)
    assert torch.isfinite(F.solve(v, regul=1e-8).to_torch()).all()
    with pytest.raises(NotImplementedError, match="solve"):
        F.inverse()
    with pytest.raises(TypeError):
        F + FIM(model, loader_of(batches), PMatDiag)


def test_statistics_two_halves_and_empty_loader():
    model, batches, c = MODELS["conv2d"](n=11, batch_size=3)
    gen = Generator(model, fim_root(lambda *b: model(b[0]), "classif_logits"))
    empty = quasidiag_statistics(gen, [])
    assert empty.count == 0
    for n, l in gen.layer_collection.layers.items():
        assert empty.sums[f"qdiag/{n}"].shape == (l.numel(),)
        assert empty.sums[f"qcross/{n}"].shape == (l.weight_numel,)
    s1, s2 = quasidiag_statistics(gen, batches[:2]), quasidiag_statistics(gen, batches[2:])
    whole = FIM(model, loader_of(batches), PMatQuasiDiag)
    assert rel(PMatQuasiDiag.from_statistics(gen.layer_collection, s1 + s2, gen).to_torch(), whole.to_torch()) < 1e-12
    assert rel(PMatQuasiDiag.from_statistics(gen.layer_collection, s1, gen).to_torch(), whole.to_torch()) > 1e-3


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "looped"])
@pytest.mark.parametrize("name", ["conv2d", "conv1d", "mixed_cnn"])
def test_held_outputs_flush_per_chunk_and_example_chunks_add_up(name, vectorised, monkeypatch):
    """The kernels receive a chunk's output gradients together (at most ``max_outputs``
    of them, held as they came) and walk the examples in chunks (here one example at a
    time): the oracle's numbers, for QuasiDiag and Diag."""
    from nngeo_dist.generator import capture, layers

    model, batches, c = MODELS[name]()
    capture._BACKWARD_CHOICE[model] = vectorised
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", 1)
    seen = []

    def spying(cls):
        held = cls.quasidiag_held

        def spy(self, mod, a, chunks, layer):
            seen.append(sum(g.shape[0] for g in chunks))
            return held(self, mod, a, chunks, layer)
        monkeypatch.setattr(cls, "quasidiag_held", spy)

    spying(layers.AffineMath)
    spying(layers.ConvMath)
    monkeypatch.setattr(layers, "fastest", lambda key, routes, device: routes["patches"]())
    dense = oracle.fim_dense(model, batches, variant_of(c))
    kw = dict(variant=variant_of(c), max_outputs=2, progress=False)
    got = FIM(model, loader_of(batches), PMatQuasiDiag, **kw)
    assert rel(got.to_torch(), dense * pattern(model)) < RTOL
    assert seen and max(seen) == 2
    assert rel(FIM(model, loader_of(batches), PMatDiag, **kw).get_diag(), torch.diagonal(dense)) < RTOL


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("right", [False, True], ids=["plain", "rotated"])
def test_square_sums_over_uneven_example_chunks(rows_per_chunk, right, monkeypatch):
    """The per-slot squares and weight-bias products of a batch walked in example chunks
    (the last one shorter: 7 examples in chunks of 3) against the per-example products
    formed at once by einsum."""
    from nngeo_dist.generator import layers

    g = torch.Generator().manual_seed(0)
    N, i1, T, o = 7, 5, 6, 4
    p = torch.randn(N, i1, T, generator=g, dtype=torch.float64)
    qs = [torch.randn(N, T, o, generator=g, dtype=torch.float64) for _ in range(3)]
    R = torch.randn(o, o, generator=g, dtype=torch.float64) if right else None
    monkeypatch.setattr(layers, "PATCH_CHUNK_BYTES", rows_per_chunk * i1 * T * 8)
    d, cross = layers._square_sums_by_example_chunks(layers.example_chunks(p), qs, R, cross_rows=i1 - 1)
    gw = torch.stack([torch.einsum("nit,nto->nio", p, q if R is None else q @ R) for q in qs])
    assert rel(d, (gw ** 2).sum(dim=(0, 1))) < 1e-12
    assert rel(cross, (gw[:, :, :-1] * gw[:, :, -1:]).sum(dim=(0, 1))) < 1e-12
