"""PMatMixed: one representation per layer. It equals its parts built on their own and
assembled by hand, takes one pass over the data for all parts, and every operation is the
sum or concatenation of the parts'.
"""
from __future__ import annotations

import pytest
import torch

import oracle
from models import MODELS, loader_of
from nngeo_dist import FIM, LayerCollection
from nngeo_dist.generator import Generator
from nngeo_dist.generator.variants import fim_root
from nngeo_dist.object import (
    PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatImplicit, PMatKFAC, PMatLowRank, PMatMixed,
    PMatQuasiDiag, PVector,
)
from checks import rel
from test_kfac import RTOL, check_against_dense, random_vector

MAPPING = {"Conv2d": PMatKFAC, "Linear": PMatEKFAC, "4": PMatQuasiDiag, "default": PMatBlockDiag}


class CountingLoader:
    """Iterates ``batches``; counts how many batches were read (``passes`` over them)."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    @property
    def passes(self) -> float:
        return self.read / len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.read += 1
            yield b

    def __len__(self):
        return len(self.batches)


def by_hand(model, batches, mapping, variant="classif_logits", **kw):
    """Each part built alone on its sub-collection, placed into a (d, d) matrix."""
    lc = LayerCollection.from_model(model)
    M = torch.zeros(lc.numel(), lc.numel(), dtype=torch.float64)
    parts = {}
    for name, layer in lc.layers.items():
        cls = mapping.get(name) or mapping.get(layer.kind) or mapping["default"]
        parts.setdefault(cls, []).append(name)
    out = {}
    for cls, names in parts.items():
        sub = lc.sub_collection(names)
        P = FIM(model, loader_of(batches), cls, variant=variant, layer_collection=sub, **kw)
        idx = torch.cat([torch.arange(lc.p_pos[n], lc.p_pos[n] + lc[n].numel()) for n in names])
        M[idx[:, None], idx[None, :]] = P.to_torch()
        out[cls] = (P, idx)
    return M, out


def test_equals_parts_assembled_by_hand_in_one_pass():
    model, batches, c = MODELS["mixed_cnn"]()
    loader = CountingLoader(batches)
    F = FIM(model, loader, MAPPING)
    assert isinstance(F, PMatMixed) and loader.passes == 1
    assert [type(p) for p in F.parts] == [PMatKFAC, PMatBlockDiag, PMatQuasiDiag, PMatEKFAC]
    assert list(F.part_of("4").layer_collection.layers) == ["4"]  # the name beats the type
    M_ref, parts = by_hand(model, batches, MAPPING)
    M = F.to_torch()
    assert rel(M, M_ref) < RTOL
    check_against_dense(F, M)
    # operations are the parts' own, placed by hand
    v = random_vector(F.layer_collection, 1)
    x = v.to_torch()
    out = torch.zeros_like(x)
    for cls, (P, idx) in parts.items():
        sub_v = PVector(P.layer_collection, vector_repr=x[idx])
        kw = {"use_pi": True} if cls is PMatKFAC else {}
        out[idx] = P.solve(sub_v, regul=1e-3, **kw).to_torch()
    assert rel(F.solve(v, regul=1e-3, use_pi=True).to_torch(), out) < RTOL
    # EKFAC parts are re-fitted in one more pass, like the EKFAC built alone
    F.update_diag(loader)
    assert loader.passes == 2
    E_alone = parts[PMatEKFAC][0]
    E_alone.update_diag(loader_of(batches))
    assert rel(F.part_of("7").to_torch(), E_alone.to_torch()) < RTOL


@pytest.mark.parametrize("cls", [PMatDiag, PMatBlockDiag, PMatDense, PMatKFAC, PMatEKFAC, PMatQuasiDiag])
def test_one_part_equals_the_representation(cls):
    name = "conv1d" if cls in (PMatKFAC, PMatEKFAC) else "mixed_cnn"
    model, batches, c = MODELS[name]()
    F = FIM(model, loader_of(batches), {"default": cls})
    R = FIM(model, loader_of(batches), cls)
    assert rel(F.to_torch(), R.to_torch()) < RTOL


def test_dense_part_is_dense_across_its_layers():
    model, batches, c = MODELS["batchnorm2d"]()
    F = FIM(model, loader_of(batches), {"Conv2d": PMatKFAC, "default": PMatDense})
    ref = oracle.fim_dense(model, batches, "classif_logits")
    lc = F.layer_collection
    idx = torch.cat([torch.arange(lc.p_pos[n], lc.p_pos[n] + lc[n].numel()) for n in ("1", "4")])
    assert rel(F.to_torch()[idx[:, None], idx[None, :]], ref[idx[:, None], idx[None, :]]) < RTOL
    s = lc.p_pos["0"]
    assert F.to_torch()[s:s + lc["0"].numel()].index_select(1, idx).abs().max() == 0


@pytest.mark.parametrize("cls", [PMatLowRank, PMatImplicit])
def test_parts_without_statistics_are_built_on_their_own(cls):
    model, batches, c = MODELS["layernorm"]()
    loader = CountingLoader(batches)
    mapping = {"Linear": PMatKFAC, "default": cls}
    F = FIM(model, loader, mapping)
    assert loader.passes == (2 if cls is PMatLowRank else 1)  # PMatImplicit reads data later
    _, parts = by_hand(model, batches, {"Linear": PMatKFAC, "default": PMatDense})
    v = random_vector(F.layer_collection, 2)
    x = v.to_torch()
    ref = torch.zeros_like(x)
    for P, idx in parts.values():
        ref[idx] = P.mv(PVector(P.layer_collection, vector_repr=x[idx])).to_torch()
    assert rel(F.mv(v).to_torch(), ref) < RTOL
    assert rel(F.vTMv(v), x @ ref) < RTOL
    with pytest.raises(NotImplementedError, match="statistics"):
        gen = Generator(model, fim_root(lambda *b: model(b[0]), "classif_logits"))
        PMatMixed.statistics(gen, batches, mapping=mapping)


def test_linear_algebra_parts_by_parts():
    model, batches, c = MODELS["batchnorm1d"](n=30, batch_size=8)
    mapping = {"Linear": PMatKFAC, "default": PMatBlockDiag}
    F = FIM(model, loader_of(batches), mapping, variant="regression")
    M = F.to_torch()
    v = random_vector(F.layer_collection, 3)
    inv = F.inverse(regul=1e-3, use_pi=False)
    assert rel(inv.to_torch(), torch.linalg.inv(M + 1e-3 * torch.eye(M.shape[0], dtype=M.dtype))) < 1e-9
    assert rel(F.solve(v, regul=1e-3, use_pi=False).to_torch(), inv.mv(v).to_torch()) < 1e-9
    G = FIM(model, loader_of(batches), {"Linear": PMatBlockDiag, "default": PMatBlockDiag})
    B = FIM(model, loader_of(batches), {"Linear": PMatQuasiDiag, "default": PMatBlockDiag}, variant="regression")
    B2 = 2 * B
    assert rel((B2 - B).to_torch(), B.to_torch()) < RTOL
    assert rel((B + B2).to_torch(), 3 * B.to_torch()) < RTOL
    with pytest.raises(TypeError, match="different parts"):
        B + G
    with pytest.raises(NotImplementedError):  # KFAC + KFAC is not KFAC
        F + F
    with pytest.raises(NotImplementedError, match="pow"):  # BlockDiag has no pow
        F.pow(2)
    assert rel((0.5 * F).to_torch(), 0.5 * M) < RTOL


def test_two_halves_of_the_statistics():
    model, batches, c = MODELS["mixed_cnn"](n=11, batch_size=3)
    gen = Generator(model, fim_root(lambda *b: model(b[0]), "classif_logits"))
    s1 = PMatMixed.statistics(gen, batches[:2], mapping=MAPPING)
    s2 = PMatMixed.statistics(gen, batches[2:], mapping=MAPPING)
    whole = FIM(model, loader_of(batches), MAPPING)
    F = PMatMixed.from_statistics(gen.layer_collection, s1 + s2, gen, mapping=MAPPING)
    assert rel(F.to_torch(), whole.to_torch()) < 1e-12
    assert rel(PMatMixed.from_statistics(gen.layer_collection, s1, gen, mapping=MAPPING).to_torch(), whole.to_torch()) > 1e-3
    empty = PMatMixed.statistics(gen, [], mapping=MAPPING)
    assert empty.count == 0 and set(empty.sums) == set(s1.sums) and empty.symmetric == s1.symmetric
    assert all(empty.sums[k].shape == s1.sums[k].shape for k in s1.sums)


def test_eig_dtype_reaches_the_kfac_parts():
    model, batches, c = MODELS["batchnorm1d"]()
    F = FIM(model, loader_of(batches), {"Linear": PMatKFAC, "default": PMatDiag}, eig_dtype=torch.float64)
    assert F.part_of("0").eig_dtype == torch.float64


def test_bad_mappings():
    model, batches, c = MODELS["mixed_cnn"]()
    loader = loader_of(batches)
    with pytest.raises(ValueError, match="no key.*default"):
        FIM(model, loader, {"Linear": PMatKFAC})
    with pytest.raises(ValueError, match="'Lienar'"):
        FIM(model, loader, {"Lienar": PMatKFAC, "default": PMatDiag})
    with pytest.raises(TypeError, match="representation class"):
        FIM(model, loader, {"default": "PMatDiag"})
    with pytest.raises(TypeError, match="representation class"):
        FIM(model, loader, {"default": PMatMixed})
    with pytest.raises(TypeError, match="no part accepts"):
        FIM(model, loader, {"default": PMatBlockDiag}, use_py=False)
    with pytest.raises(TypeError, match="'1' \\(BatchNorm2d\\)"):  # KFAC asked for a norm layer
        FIM(model, loader, {"default": PMatKFAC})
    F = FIM(model, loader, {"Linear": PMatKFAC, "default": PMatBlockDiag})
    with pytest.raises(TypeError, match="no part accepts"):
        F.solve(random_vector(F.layer_collection), regul=1e-3, use_py=True)
