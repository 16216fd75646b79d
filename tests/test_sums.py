"""Float32 and half-precision results that sum many numbers stay accurate, and PMatDense's
kept Cholesky factor never answers for another matrix.

torch's norm kernels accumulate a large float32 tensor in float32 (1.6e-3 relative error on
a 6000 x 6000 matrix): every Frobenius norm and 2-norm of the library adds float32 dots of
pieces in float64 instead, and half precision in float32 (:mod:`nngeo_dist.object.sums`).
Oracle: the same numbers in float64.
"""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from checks import rel
from nngeo_dist import LayerCollection
from nngeo_dist.object import FVector, PMatBlockDiag, PMatDense, PMatDiag, PMatLowRank, PVector
from nngeo_dist.object.sums import l2_norm, sum_of_squares

#: float32 sums of 3.6e7 positive numbers: the library's are within a few float32 ulps
RTOL = 1e-6


def _big(d=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(d, d, generator=g)


def _collection(d):
    return LayerCollection.from_model(nn.Linear(d - 1, 1))  # d parameters in one layer


def test_sum_of_squares_matches_float64():
    x = _big()
    want = (x.double() ** 2).sum()
    assert rel(sum_of_squares(x).double(), want) <= RTOL
    assert rel(sum_of_squares(x, dim=0).double(), (x.double() ** 2).sum(0)) <= RTOL
    assert rel(l2_norm(x).double(), want.sqrt()) <= RTOL
    assert sum_of_squares(x[:0]).item() == 0 and sum_of_squares(x[:0], dim=0).shape == (6000,)
    with pytest.raises(ValueError, match="dim=0 sums the rows of a 2-d tensor"):
        sum_of_squares(x.reshape(-1), dim=0)


def test_frobenius_norms_and_vector_norms_are_float32_accurate():
    M = _big()
    d = M.shape[0]
    lc = _collection(d)
    want = M.double().norm()
    assert rel(PMatDense(lc, M).frobenius_norm().double(), want) <= RTOL
    assert rel(PMatBlockDiag(lc, {next(iter(lc.layers)): M}).frobenius_norm().double(), want) <= RTOL
    flat = M.reshape(-1)[:d]
    assert rel(PMatDiag(lc, flat).frobenius_norm().double(), flat.double().norm()) <= 1e-7
    big_flat = M.reshape(-1)
    assert rel(PVector(_collection(big_flat.numel()), vector_repr=big_flat).norm().double(), want) <= RTOL
    assert rel(FVector(M).norm().double(), want) <= RTOL
    # ||J^T J||_F / n from the smaller side (J J^T, 3000 x 3000) and from the d x d matrix
    for n, dd in ((3000, 3100), (3100, 3000)):
        J = torch.rand(1, n, dd, generator=torch.Generator().manual_seed(1))
        F = PMatLowRank(_collection(dd), J, n)
        Jd = J.double().reshape(-1, dd)
        assert rel(F.frobenius_norm().double(), (Jd.t() @ Jd / n).norm()) <= RTOL


def test_norm_backward_at_zero_is_zero():
    v = PVector(_collection(4), vector_repr=torch.zeros(4, requires_grad=True))
    v.norm().backward()
    assert torch.equal(v.to_torch().grad, torch.zeros(4))


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.t() / d


def _solved(M, v, regul):
    A = M + regul * torch.eye(M.shape[0], dtype=M.dtype)
    return torch.linalg.solve(A, v)


def test_dense_kept_factor_follows_regul_and_data():
    d = 40
    lc = _collection(d)
    M = _spd(d, 0)
    F = PMatDense(lc, M.clone())
    v = PVector(lc, vector_repr=torch.randn(d, dtype=torch.float64))
    for regul in (1e-3, 1e-3, 1e-1, 1e-3):  # kept, then changed, then back
        assert rel(F.solve(v, regul).to_torch(), _solved(F.data, v.to_torch(), regul)) <= 1e-10
    F.data.mul_(3.0)  # modified in place: the kept factor must not answer
    assert rel(F.solve(v, 1e-3).to_torch(), _solved(M * 3.0, v.to_torch(), 1e-3)) <= 1e-10
    F.data[0, 0] += 1.0  # an indexed in-place write too
    assert rel(F.solve(v, 1e-3).to_torch(), _solved(F.data, v.to_torch(), 1e-3)) <= 1e-10
    F.data = _spd(d, 1)  # replaced
    assert rel(F.solve(v, 1e-3).to_torch(), _solved(F.data, v.to_torch(), 1e-3)) <= 1e-10


def test_dense_kept_factor_is_not_pickled():
    d = 30
    lc = _collection(d)
    F = PMatDense(lc, _spd(d, 2))
    v = PVector(lc, vector_repr=torch.randn(d, dtype=torch.float64))
    F.solve(v, 1e-2)
    G = pickle.loads(pickle.dumps(F))
    assert G._factor is None
    assert rel(G.solve(v, 1e-2).to_torch(), _solved(F.data, v.to_torch(), 1e-2)) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_half_precision_norm_neither_overflows_nor_loses_precision(dtype, contiguous):
    # entries of 300: their squares (9e4) overflow float16 (max 65504) though the norm
    # (~1643) does not; torch's norm accumulates in float32
    t = torch.full((30, 3), 300.0, dtype=dtype)
    if not contiguous:
        t = t.t()
    ref = torch.linalg.vector_norm(t.double())
    got = l2_norm(t)
    assert got.dtype == dtype
    assert torch.isfinite(got)
    assert abs(got.double() - ref) <= 2 * torch.finfo(dtype).eps * ref
