"""An Embedding with a realistic vocabulary: its kernels work from token ids (no one-hot
patches of N x T x V), and agree with the torch.func oracle.

The vocabulary is large enough that the pairwise Gram form (token matches) is the cheaper
one, so both Gram routes of the layer are exercised across this file and the zoo tests.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import oracle
from checks import rel
from models import MeanOverDim, loader_of
from nngeo_dist import FIM, GramMatrix, Jacobian
from nngeo_dist.generator import Generator
from nngeo_dist.object import PMatDiag

RTOL = 1e-10
V, D, T, C = 20_000, 6, 5, 3


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(V, D, padding_idx=3), MeanOverDim(1), nn.Linear(D, C)).double().eval()
    x = torch.randint(0, 40, (9, T), generator=g) * 499  # repeated tokens within and across examples
    x[0, :2] = 3  # padding
    batches = [(x[:5],), (x[5:],)]
    J, f = oracle.jacobian_and_outputs(model, None, batches)
    return model, batches, J, f


def test_diag_matches_oracle(case):
    model, batches, J, f = case
    p = torch.softmax(f, dim=1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("aik,iab,bik->k", J, H, J) / J.shape[1]
    got = FIM(model, loader_of(batches), PMatDiag, progress=False).get_diag()
    assert want[: V * D].abs().max() > 0
    assert rel(got, want) < RTOL


def test_jacobian_matches_oracle(case):
    model, batches, J, _ = case
    got = Jacobian(model, loader_of(batches), progress=False).to_torch()
    assert rel(got, J) < RTOL


def test_gram_uses_token_matches_and_matches_oracle(case):
    model, batches, J, _ = case
    gen = Generator(model, progress=False)
    feats = gen.gram_features(loader_of(batches))
    assert feats[0][1][0]["0"][0] == "pairwise"  # token matches, not V-wide gradients
    got = GramMatrix(model, loader_of(batches), progress=False).to_torch()
    assert rel(got, torch.einsum("aik,bjk->aibj", J, J)) < RTOL


def test_no_kernel_builds_one_hot_patches(case, monkeypatch):
    """Every statistic of an Embedding reads token ids: the one-hot patches are never
    formed (they would be N x T x V)."""
    from nngeo_dist.generator.layers import EmbeddingMath
    from nngeo_dist.object import PMatEKFAC, PMatKFAC, PMatQuasiDiag

    def refuse(self, mod, a):
        raise AssertionError("one-hot patches built")

    monkeypatch.setattr(EmbeddingMath, "_onehot", refuse)
    model, batches, J, _ = case
    loader = loader_of(batches)
    for rep in (PMatDiag, PMatKFAC, PMatQuasiDiag):
        FIM(model, loader, rep, progress=False)
    FIM(model, loader, PMatEKFAC, progress=False).update_diag(loader)
    GramMatrix(model, loader, progress=False)
    Jacobian(model, loader, progress=False)
