"""The helpers a user calls (FIM variants, FIM_MonteCarlo, GramMatrix, Jacobian), the
push-forward / pull-back maps, FMatDense, ``n_output`` inference and float32, against the
independent float64 oracle (tests/oracle.py).

Tolerances: float64 relative error 1e-10; float32 results within 1e-5 relative of the
float64 oracle (DESIGN.md §5). Monte-Carlo FIMs are checked against the closed form within
a number of standard errors of the estimator derived below from the oracle's Jacobians.
"""
from __future__ import annotations

import copy
import zlib

import pytest
import torch
import torch.nn.functional as Fn

import oracle
from models import MODELS, loader_of, make

from nngeo_dist import FIM, FIM_MonteCarlo, GramMatrix, Jacobian
from nngeo_dist.generator import gram as gram_assembly
from nngeo_dist.object import (
    FMatDense,
    FVector,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PullBackDense,
    PushForwardDense,
    PushForwardImplicit,
    PVector,
)
from checks import rel

RTOL = 1e-10
RTOL32 = 1e-5
ALL = list(MODELS)
pm = pytest.mark.parametrize


models = pm("name", ALL)




# ------------------------------------------------------------------------------------------
# one oracle per model
_CASES: dict = {}


class Case:
    def __init__(self, name):
        self.name = name
        self.model, self.batches, self.c = make(name)
        self.loader = loader_of(self.batches)
        self.J, self.f = oracle.jacobian_and_outputs(self.model, None, self.batches)
        _, self.n, self.d = self.J.shape
        self.K = torch.einsum("aik,bjk->aibj", self.J, self.J)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        self.v = torch.randn(self.d, generator=g, dtype=torch.float64)
        self.u = torch.randn(self.c, self.n, generator=g, dtype=torch.float64)
        self._fims = {}

    def fim(self, variant, function=None, key=None):
        k = key or variant
        if k not in self._fims:
            self._fims[k] = oracle.fim_dense(self.model, self.batches, variant, function=function)
        return self._fims[k]


def case(name) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


def log_likelihood(model, c):
    """log p(y|x) of the true label, (N, 1): its covariance of gradients is the empirical
    Fisher."""
    if c == 1:
        def function(x, y):
            return -Fn.binary_cross_entropy_with_logits(
                model(x)[:, 0], y.to(torch.float64), reduction="none"
            ).unsqueeze(1)
    else:
        def function(x, y):
            return -Fn.cross_entropy(model(x), y, reduction="none").unsqueeze(1)
    return function


# ------------------------------------------------------------------------------------------
# FIM variants
CLASSIF = [n for n in ALL if MODELS[n].n_output > 1]
IMPLICIT_SUBSET = ["linear", "conv2d_stride_pad", "convtranspose2d", "batchnorm2d", "layernorm_seq",
                   "rmsnorm", "embedding_padidx", "mixed_cnn"]


def test_a_tuple_of_tensors_is_one_batch():
    """nngeometry's ``examples=(x, y)``: one batch of two fields, as a DataLoader over
    TensorDataset(x, y) reads them (it was read as two batches, x then y)."""
    cs = case("linear")
    x, y = (torch.cat(f) for f in zip(*cs.batches))
    assert rel(FIM(cs.model, (x, y), PMatDense).to_torch(), cs.fim("classif_logits")) < 1e-12
    assert rel(GramMatrix(cs.model, (x, y)).to_torch(), cs.K) < 1e-12
    assert rel(Jacobian(cs.model, (x,)).to_torch(), cs.J) < 1e-12


def test_sparse_embedding_gradients():
    """Embedding(sparse=True) gets sparse gradients from autograd: the implicit operator
    (whose mv is a backward pass) and PVector.from_model_grad work on them as on dense
    ones, against the float64 oracle of the same model with sparse=False."""
    dense_model, batches, _ = make("embedding_padidx")
    F_ref = oracle.fim_dense(dense_model, batches)  # the same function, dense gradients
    model = copy.deepcopy(dense_model)
    model[0].sparse = True
    loader = loader_of(batches)
    F = FIM(model, loader, PMatImplicit)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(F_ref.shape[0], generator=g, dtype=torch.float64)
    pv = PVector(F.layer_collection, vector_repr=v.clone())
    assert rel(F.mv(pv).to_torch(), F_ref @ v) < 1e-12
    regul = 1e-2
    x = F.solve(pv, regul=regul).to_torch()
    assert rel(x, torch.linalg.solve(F_ref + regul * torch.eye(len(v), dtype=v.dtype), v)) < 1e-8
    model.zero_grad()
    model(batches[0][0]).sum().backward()
    assert model[0].weight.grad.is_sparse
    grads = torch.cat([p.grad.to_dense().flatten() for p in model.parameters()])
    assert torch.equal(PVector.from_model_grad(model).to_torch(), grads)


@pm("name", CLASSIF)
def test_fim_classif_logits(name):
    cs = case(name)
    F = FIM(cs.model, cs.loader, PMatDense, variant="classif_logits")
    assert rel(F.to_torch(), cs.fim("classif_logits")) <= RTOL


def test_fim_classif_logits_is_the_default():
    cs = case("conv1d")
    assert rel(FIM(cs.model, cs.loader, PMatDense).to_torch(), cs.fim("classif_logits")) <= RTOL


@pm("rep", [PMatDense, PMatDiag, PMatImplicit], ids=["PMatDense", "PMatDiag", "PMatImplicit"])
def test_fim_classif_binary_logits(rep):
    cs = case("linear_binary")
    assert cs.c == 1
    F = FIM(cs.model, cs.loader, rep, variant="classif_binary_logits")
    ref = cs.fim("classif_binary_logits")
    if rep is PMatDense:
        assert rel(F.to_torch(), ref) <= RTOL
    elif rep is PMatDiag:
        assert rel(F.get_diag(), torch.diagonal(ref)) <= RTOL
    else:
        v = PVector(F.layer_collection, vector_repr=cs.v.clone())
        assert rel(F.vTMv(v), cs.v @ ref @ cs.v) <= RTOL
        assert rel(F.mv(v).to_torch(), ref @ cs.v) <= RTOL


@models
def test_fim_regression(name):
    cs = case(name)
    F = FIM(cs.model, cs.loader, PMatDense, variant="regression")
    ref = cs.fim("regression")
    assert rel(F.to_torch(), ref) <= RTOL
    # regression FIM = J^T J / n: its trace is the Gram trace / n
    assert rel(F.trace(), torch.einsum("aiai->", cs.K) / cs.n) <= RTOL


@models
def test_fim_custom_function_empirical_fisher(name):
    """A custom (N, 1) function: 1/n sum_i grad log p(y_i|x_i) grad log p(y_i|x_i)^T."""
    cs = case(name)
    fn = log_likelihood(cs.model, cs.c)
    F = FIM(cs.model, cs.loader, PMatDense, variant="regression", function=fn)
    ref = cs.fim("function", function=fn, key="empirical")
    assert rel(F.to_torch(), ref) <= RTOL


@pm("name", IMPLICIT_SUBSET)
@pm("variant", ["regression", "empirical", "classif_logits"])
def test_fim_variants_implicit(name, variant):
    """The variants through the forward-mode path (PMatImplicit: vTMv and mv)."""
    cs = case(name)
    if variant == "empirical":
        fn = log_likelihood(cs.model, cs.c)
        F = FIM(cs.model, cs.loader, PMatImplicit, variant="regression", function=fn)
        ref = cs.fim("function", function=fn, key="empirical")
    else:
        if variant == "classif_logits" and cs.c == 1:
            pytest.skip("one logit: the softmax FIM is zero")
        F = FIM(cs.model, cs.loader, PMatImplicit, variant=variant)
        ref = cs.fim(variant)
    v = PVector(F.layer_collection, vector_repr=cs.v.clone())
    assert rel(F.vTMv(v), cs.v @ ref @ cs.v) <= RTOL
    assert rel(F.mv(v).to_torch(), ref @ cs.v) <= RTOL


@pm("name", ["linear", "conv2d", "embedding", "mixed_cnn"])
def test_fim_custom_function_with_classif_logits(name):
    """``function`` replaces model(x) as the logits of the classif_logits variant."""
    cs = case(name)

    def fn(x, y):
        return 0.5 * cs.model(x) + 0.1

    F = FIM(cs.model, cs.loader, PMatDense, variant="classif_logits", function=fn)
    ref = oracle.fim_dense(cs.model, cs.batches, "classif_logits", function=fn)
    assert rel(F.to_torch(), ref) <= RTOL
    # and it differs from the FIM of model(x) itself
    assert rel(ref, cs.fim("classif_logits")) > 1e-3


@pm("name", ["linear", "conv1d", "layernorm_2d"])
def test_n_output_given_or_inferred(name):
    cs = case(name)
    a = FIM(cs.model, cs.loader, PMatDense, n_output=cs.c).to_torch()
    b = FIM(cs.model, cs.loader, PMatDense).to_torch()
    assert torch.equal(a, b)
    assert GramMatrix(cs.model, cs.loader, n_output=cs.c).to_torch().shape == (cs.c, cs.n, cs.c, cs.n)
    assert Jacobian(cs.model, cs.loader, n_output=cs.c).to_torch().shape == (cs.c, cs.n, cs.d)


@pm("helper", ["FIM", "FIM_MonteCarlo"])
def test_n_output_check_keeps_the_batches_of_a_one_shot_iterator(helper):
    """The n_output check draws the first non-empty batch: a generator of batches (read
    once) must still be computed whole, that batch and the empty one before it included."""
    cs = case("linear")
    empty = tuple(t[:0] for t in cs.batches[0])

    def build(loader, **kw):
        if helper == "FIM":
            return FIM(cs.model, loader, PMatDense, **kw).to_torch()
        return FIM_MonteCarlo(cs.model, loader, PMatDense, trials=2, seed=3, **kw).to_torch()

    got = build((b for b in [empty, *cs.batches]), n_output=cs.c)
    if helper == "FIM":  # the closed form over every batch
        assert rel(got, cs.fim("classif_logits")) <= RTOL
    else:  # the same seeded draws as from the loader, which reads every batch
        assert rel(got, build(cs.loader)) < 1e-13


# ------------------------------------------------------------------------------------------
# FIM_MonteCarlo
#
# Estimator: F_hat = 1/n sum_i 1/T sum_t g_it g_it^T, g_it = grad_w log p(y_it | x_i), draws
# independent. E[F_hat] = F and, entry by entry, Var(F_hat_kl) = 1/(n^2 T) sum_i
# Var_y(g_k g_l | x_i), so the expected squared Frobenius error is
#     s^2 = E||F_hat - F||_F^2 = 1/(n^2 T) sum_i ( E||g_i||^4 - ||F_i||_F^2 ),
# F_i = E[g_i g_i^T]. From the oracle's per-example Jacobians J_i (c, d), outputs f_i:
# - classif_logits: g_i(y) = J_i^T (e_y - p_i), so E||g||^4 = sum_y p_iy ||J_i^T (e_y - p_i)||^4;
# - regression: g_i = J_i^T eps, eps ~ N(0, I_c); with A_i = J_i J_i^T,
#   E||g||^4 = (tr A_i)^2 + 2 tr(A_i^2) and ||F_i||_F^2 = tr(A_i^2).
# ||F_hat - F||_F concentrates around s (a sum of many terms): we assert
# 0.2 s < ||F_hat - F||_F < 5 s for a fixed seed. The lower bound catches an estimator
# that does not sample (closed form returned) or whose variance is wrongly scaled by trials.
# The same reasoning for F_hat v: E||(F_hat - F) v||^2 = 1/(n^2 T) sum_i
# (E[(g.v)^2 ||g||^2] - ||F_i v||^2).

MC_MODEL = "linear"
TRIALS = 2000


def _mc_classif_terms(cs):
    p = torch.softmax(cs.f, dim=1)  # (n, c)
    # G[y, i] = J_i^T (e_y - p_i): (c, n, d)
    G = cs.J - torch.einsum("ia,aid->id", p, cs.J).unsqueeze(0)
    w = p.t()  # (c, n): probability of label y for example i
    F_i = torch.einsum("yi,yid,yie->ide", w, G, G)
    return G, w, F_i


def mc_std(cs, variant, trials, v=None):
    """Standard error of ||F_hat - F||_F (v None) or of ||(F_hat - F) v||."""
    n = cs.n
    if variant == "classif_logits":
        G, w, F_i = _mc_classif_terms(cs)
        sq = (G * G).sum(-1)  # (c, n)
        if v is None:
            e4 = (w * sq * sq).sum(0)
            per = e4 - (F_i * F_i).sum((1, 2))
        else:
            gv = G @ v
            per = (w * gv * gv * sq).sum(0) - ((F_i @ v) ** 2).sum(-1)
        return (per.sum() / (n * n * trials)).sqrt()
    A = torch.einsum("aid,bid->iab", cs.J, cs.J)
    trA = A.diagonal(dim1=1, dim2=2).sum(-1)
    trA2 = (A * A).sum((1, 2))
    assert v is None
    return (((trA**2) + trA2).sum() / (n * n * trials)).sqrt()


def test_mc_standard_error_derivation():
    """The F_i of the derivation average to the oracle's closed form (checks the algebra)."""
    cs = case(MC_MODEL)
    _, _, F_i = _mc_classif_terms(cs)
    assert rel(F_i.mean(0), cs.fim("classif_logits")) <= RTOL
    A = torch.einsum("aid,bid->iab", cs.J, cs.J)
    # ||J^T J||_F = ||J J^T||_F
    JtJ = torch.einsum("aid,aie->ide", cs.J, cs.J)
    assert rel((JtJ * JtJ).sum((1, 2)), (A * A).sum((1, 2))) <= RTOL


@pm("variant", ["classif_logits", "regression"])
def test_fim_montecarlo_within_standard_errors(variant):
    cs = case(MC_MODEL)
    F_mc = FIM_MonteCarlo(cs.model, cs.loader, PMatDense, variant=variant, trials=TRIALS, seed=0)
    ref = cs.fim(variant)
    s = mc_std(cs, variant, TRIALS)
    err = (F_mc.to_torch() - ref).norm()
    assert 0.2 * s < err < 5 * s, f"error {err:.3e} vs standard error {s:.3e}"
    assert s < 0.05 * ref.norm()  # the test has power: 5 s is a few % of ||F||


def test_fim_montecarlo_implicit_mv():
    """PMatImplicit on a Monte-Carlo FIM: mv(v) = 1/n sum_i mean_t g_it (g_it . v) must use
    the same draws in its forward-mode and reverse-mode halves."""
    cs = case(MC_MODEL)
    F_mc = FIM_MonteCarlo(cs.model, cs.loader, PMatImplicit, trials=TRIALS, seed=0)
    ref = cs.fim("classif_logits") @ cs.v
    s = mc_std(cs, "classif_logits", TRIALS, cs.v)
    assert s < 0.05 * ref.norm()
    got = F_mc.mv(PVector(F_mc.layer_collection, vector_repr=cs.v.clone())).to_torch()
    err = (got - ref).norm()
    assert err < 5 * s, f"error {err:.3e} vs standard error {s:.3e}"


@pm("variant", ["classif_logits", "regression"])
def test_fim_montecarlo_implicit_is_one_matrix(variant):
    """A Monte-Carlo PMatImplicit is the matrix of ONE set of draws: every operation (one
    pass over the data each) replays them, so it equals PMatDense of the same seed, and
    CG converges to that matrix's solve."""
    cs = case(MC_MODEL)
    kw = dict(variant=variant, trials=2, seed=11)
    D = FIM_MonteCarlo(cs.model, cs.loader, PMatDense, **kw).to_torch()
    F = FIM_MonteCarlo(cs.model, cs.loader, PMatImplicit, **kw)
    v = PVector(F.layer_collection, vector_repr=cs.v.clone())
    ref = cs.v @ D @ cs.v
    assert rel(F.mv(v).to_torch(), D @ cs.v) < 1e-12
    for _ in range(2):
        assert rel(F.vTMv(v), ref) < 1e-12
    assert rel(F.trace(), torch.trace(D)) < 1e-12
    assert rel(F.get_diag(), torch.diagonal(D)) < 1e-12
    regul = 1e-2 * float(torch.trace(D)) / D.shape[0]
    x = F.solve(v, regul=regul).to_torch()
    assert rel(x, torch.linalg.solve(D + regul * torch.eye(D.shape[0], dtype=D.dtype), cs.v)) < 1e-8


def test_fim_montecarlo_implicit_part_of_a_mapping_is_one_matrix():
    """An implicit part of a per-layer mapping draws from the helper's seeded stream too:
    with every layer in it, it is the PMatDense of the same seed, at every operation."""
    cs = case(MC_MODEL)
    kw = dict(trials=2, seed=11)
    D = FIM_MonteCarlo(cs.model, cs.loader, PMatDense, **kw).to_torch()
    F = FIM_MonteCarlo(cs.model, cs.loader, {"default": PMatImplicit}, **kw)
    v = PVector(F.layer_collection, vector_repr=cs.v.clone())
    for _ in range(2):
        assert rel(F.vTMv(v), cs.v @ D @ cs.v) < 1e-12
    assert rel(F.mv(v).to_torch(), D @ cs.v) < 1e-12


def test_fim_montecarlo_implicit_unseeded_draws_once_from_global_rng():
    """Without a seed the draws come from torch's global generator: the first operation
    advances it as a dense build would, later operations replay without touching it."""
    cs = case(MC_MODEL)
    torch.manual_seed(21)
    D = FIM_MonteCarlo(cs.model, cs.loader, PMatDense, trials=2).to_torch()
    after_build = torch.rand(3)
    torch.manual_seed(21)
    F = FIM_MonteCarlo(cs.model, cs.loader, PMatImplicit, trials=2)
    v = PVector(F.layer_collection, vector_repr=cs.v.clone())
    first = F.vTMv(v)
    assert torch.equal(torch.rand(3), after_build)
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    assert rel(F.vTMv(v), first) < 1e-12 and rel(first, cs.v @ D @ cs.v) < 1e-12
    assert torch.equal(torch.rand(3), expected_next)


@pm("variant", ["classif_logits", "regression"])
def test_fim_montecarlo_seed_reproducible(variant):
    cs = case(MC_MODEL)

    def run(seed):
        return FIM_MonteCarlo(cs.model, cs.loader, PMatDense, variant=variant, trials=3, seed=seed).to_torch()

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert rel(a, c) > 1e-3


def test_fim_montecarlo_seed_independent_of_global_rng():
    """With a seed, the global RNG state does not matter."""
    cs = case(MC_MODEL)
    torch.manual_seed(1)
    a = FIM_MonteCarlo(cs.model, cs.loader, PMatDiag, trials=2, seed=5).get_diag()
    torch.manual_seed(2)
    b = FIM_MonteCarlo(cs.model, cs.loader, PMatDiag, trials=2, seed=5).get_diag()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# GramMatrix, Jacobian, push-forward / pull-back
_OBJ: dict = {}


def gram(name) -> FMatDense:
    if ("gram", name) not in _OBJ:
        cs = case(name)
        _OBJ[("gram", name)] = GramMatrix(cs.model, cs.loader)
    return _OBJ[("gram", name)]


def jac(name) -> PushForwardDense:
    if ("jac", name) not in _OBJ:
        cs = case(name)
        _OBJ[("jac", name)] = Jacobian(cs.model, cs.loader)
    return _OBJ[("jac", name)]


@models
def test_gram_matrix(name):
    cs = case(name)
    K = gram(name)
    assert isinstance(K, FMatDense)
    T = K.to_torch()
    assert T.shape == (cs.c, cs.n, cs.c, cs.n)
    assert rel(T, cs.K) <= RTOL
    assert tuple(K.size()) == (cs.c, cs.n, cs.c, cs.n)


@models
@pm("row_tile", [1, 5])
def test_gram_matrix_in_small_tiles(name, row_tile, monkeypatch):
    """The symmetric assembly with tiles far smaller than the zoo's Grams (every example
    and output tiling, the mirrored blocks, output chunks joined) against the oracle."""
    monkeypatch.setattr(gram_assembly, "ROW_TILE", row_tile)
    cs = case(name)
    T = GramMatrix(cs.model, cs.loader, max_outputs=2).to_torch()
    assert rel(T, cs.K) <= RTOL


@models
def test_jacobian(name):
    cs = case(name)
    J = jac(name)
    assert isinstance(J, PushForwardDense)
    assert J.to_torch().shape == (cs.c, cs.n, cs.d)
    assert rel(J.to_torch(), cs.J) <= RTOL


@models
def test_pushforward_dense_mv(name):
    cs = case(name)
    J = jac(name)
    out = J.mv(PVector(J.layer_collection, vector_repr=cs.v.clone()))
    assert isinstance(out, FVector)
    assert out.to_torch().shape == (cs.c, cs.n)
    assert rel(out.to_torch(), cs.J @ cs.v) <= RTOL


@models
def test_pullback_dense_mv(name):
    cs = case(name)
    P = jac(name).transpose()
    assert isinstance(P, PullBackDense)
    out = P.mv(FVector(cs.u.clone()))
    assert isinstance(out, PVector)
    assert rel(out.to_torch(), torch.einsum("aid,ai->d", cs.J, cs.u)) <= RTOL


def test_pullback_dense_build():
    cs = case("conv2d_nobias")
    from nngeo_dist.generator import Generator

    P = PullBackDense.build(Generator(cs.model), cs.loader)
    out = P.mv(FVector(cs.u.clone())).to_torch()
    assert rel(out, torch.einsum("aid,ai->d", cs.J, cs.u)) <= RTOL


@models
def test_pushforward_implicit_mv(name):
    cs = case(name)
    J = Jacobian(cs.model, cs.loader, representation=PushForwardImplicit)
    assert isinstance(J, PushForwardImplicit)
    out = J.mv(PVector(J.layer_collection, vector_repr=cs.v.clone()))
    assert isinstance(out, FVector)
    assert rel(out.to_torch(), cs.J @ cs.v) <= RTOL


@pm("name", ["linear", "conv2d", "layernorm_seq", "embedding"])
def test_gram_and_jacobian_custom_function(name):
    cs = case(name)

    def fn(x, y):
        return torch.tanh(cs.model(x))[:, :2]

    Jo = oracle.per_example_jacobian(cs.model, fn, cs.batches)
    assert Jo.shape[0] == 2
    assert rel(Jacobian(cs.model, cs.loader, function=fn).to_torch(), Jo) <= RTOL
    K = GramMatrix(cs.model, cs.loader, function=fn).to_torch()
    assert rel(K, torch.einsum("aik,bjk->aibj", Jo, Jo)) <= RTOL


# ------------------------------------------------------------------------------------------
# FMatDense operations vs torch on the oracle's Gram
@models
def test_fmat_dense_operations(name):
    cs = case(name)
    K = gram(name)
    M = cs.K.reshape(cs.c * cs.n, cs.c * cs.n)
    u = FVector(cs.u.clone())
    x = cs.u.reshape(-1)
    out = K.mv(u)
    assert isinstance(out, FVector) and out.to_torch().shape == (cs.c, cs.n)
    assert rel(out.to_torch().reshape(-1), M @ x) <= RTOL
    assert rel(K.vTMv(u), x @ M @ x) <= RTOL
    assert rel(K.trace(), torch.trace(M)) <= RTOL
    assert rel(K.frobenius_norm(), torch.linalg.matrix_norm(M)) <= RTOL


@models
def test_fmat_dense_eigendecomposition(name):
    cs = case(name)
    K = gram(name)
    M = cs.K.reshape(cs.c * cs.n, cs.c * cs.n)
    evals, evecs = K.compute_eigendecomposition()
    ref = torch.linalg.eigvalsh(M)
    assert (evals - ref).abs().max() <= RTOL * ref.abs().max()
    assert rel(evecs @ torch.diag(evals) @ evecs.t(), M) <= RTOL
    eye = torch.eye(evecs.shape[1], dtype=evecs.dtype)
    assert (evecs.t() @ evecs - eye).abs().max() <= RTOL


def test_gram_trace_is_n_times_regression_fim_trace():
    """tr K = sum_i ||J_i||_F^2 = n tr(F_regression): Gram and FIM computed independently."""
    cs = case("mixed_cnn")
    F = FIM(cs.model, cs.loader, PMatDense, variant="regression")
    assert rel(gram("mixed_cnn").trace(), cs.n * F.trace()) <= RTOL


# ------------------------------------------------------------------------------------------
# float32: a float32 copy of the model within 1e-5 (relative) of the float64 oracle
def float32_case(name):
    cs = case(name)
    m32 = copy.deepcopy(cs.model).float()
    b32 = [tuple(t.float() if t.is_floating_point() else t for t in b) for b in cs.batches]
    return cs, m32, loader_of(b32)


@models
def test_float32(name):
    cs, m32, L32 = float32_case(name)
    variant = "classif_binary_logits" if cs.c == 1 else "classif_logits"
    ref = cs.fim(variant)

    D = FIM(m32, L32, PMatDense, variant=variant).to_torch()
    assert D.dtype == torch.float32
    assert rel(D.double(), ref) <= RTOL32

    diag = FIM(m32, L32, PMatDiag, variant=variant).get_diag()
    assert diag.dtype == torch.float32
    assert rel(diag.double(), torch.diagonal(ref)) <= RTOL32

    K = GramMatrix(m32, L32).to_torch()
    assert K.dtype == torch.float32
    assert rel(K.double(), cs.K) <= RTOL32

    I = FIM(m32, L32, PMatImplicit, variant=variant)
    q = I.vTMv(PVector(I.layer_collection, vector_repr=cs.v.float()))
    assert q.dtype == torch.float32
    assert rel(q.double(), cs.v @ ref @ cs.v) <= RTOL32
