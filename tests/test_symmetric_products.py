"""Symmetric products computed from three of their four half blocks (KFAC's input factor)
and Grams assembled from row tiles: against the plain product and the oracle, at sizes
where those routes are taken (the zoo's models are too small for them)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import oracle
from checks import rel
from models import loader_of
from nngeo_dist import FIM, GramMatrix
from nngeo_dist.generator.layers import row_products
from nngeo_dist.object import PMatKFAC


@pytest.mark.parametrize("shape", [(256, 64), (301, 97), (600, 70)])
def test_row_products_equal_the_plain_product(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    got = row_products(x)
    h = shape[0] // 2
    assert torch.equal(got[h:, :h], got[:h, h:].t())  # the mirrored half block
    assert rel(got, x @ x.t()) < 1e-13


def test_row_products_of_a_transposed_view():
    x = torch.randn(90, 300, dtype=torch.float64)  # KFAC's A reads patches transposed
    assert rel(row_products(x.t()), x.t() @ x) < 1e-13


@pytest.fixture(scope="module")
def wide_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 70), nn.Tanh(), nn.Linear(70, 10)).double().eval()
    x = torch.randn(60, 80, dtype=torch.float64)
    return model, [(x[:30],), (x[30:],)]  # 10 outputs x 30 examples = 300 rows per batch


def test_gram_of_batches_with_many_rows_matches_oracle(wide_mlp):
    model, batches = wide_mlp
    J = oracle.per_example_jacobian(model, None, batches)
    got = GramMatrix(model, loader_of(batches), progress=False).to_torch()
    assert rel(got, torch.einsum("aik,bjk->aibj", J, J)) < 1e-10


def test_kfac_input_factor_with_wide_patches_matches_its_definition():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 4, 3, padding=1).double()  # i' = 32 * 9 + 1 = 289 patch entries
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double().eval()
    x = torch.randn(6, 32, 5, 5, dtype=torch.float64)
    F = FIM(model, loader_of([(x,)]), PMatKFAC, progress=False)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 288)
    patches = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=x.dtype)], dim=1)
    A = F.data["0"][0]
    assert rel(A, patches.t() @ patches / 6) < 1e-12
