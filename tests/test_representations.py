"""Every parameter-space representation x every zoo model x every operation, against the
independent float64 oracle (tests/oracle.py: torch.func per-example Jacobians).

Exact representations (PMatDense, PMatLowRank, PMatImplicit) are compared with the oracle's
dense FIM F; the approximations with the part of F they keep: PMatDiag with diag(F),
PMatBlockDiag with F's diagonal blocks, one per layer, located with LayerCollection.p_pos.
Tolerance: relative error <= 1e-10 (float64); CG solve (PMatImplicit) to 1e-8.

An operation a representation has no closed form for must raise NotImplementedError with a
sentence naming the representation to use instead (DESIGN.md §2); arithmetic a
representation lacks may either give the right matrix or raise that error, never anything
else.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import oracle
from models import MODELS, loader_of, make, variant_of

from nngeo_dist import FIM
from nngeo_dist.object import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
    PVector,
)
from checks import rel

RTOL = 1e-10
CG_RTOL = 1e-8
ALL = list(MODELS)
REPS = [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatImplicit]
REP_IDS = [r.__name__ for r in REPS]
DENSE_LIKE = (PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank)  # materialisable




# ------------------------------------------------------------------------------------------
# caches: one oracle and one matrix per (model, representation)
_CASES: dict = {}
_MATS: dict = {}


class Case:
    def __init__(self, name):
        self.name = name
        self.model, self.batches, self.c = make(name)
        self.loader = loader_of(self.batches)
        self.variant = variant_of(self.c)
        self.F = oracle.fim_dense(self.model, self.batches, self.variant)
        self.d = self.F.shape[0]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        self.v = torch.randn(self.d, generator=g, dtype=torch.float64)
        self.v2 = torch.randn(self.d, generator=g, dtype=torch.float64)
        # a damping comparable to the mean eigenvalue: well conditioned, not negligible
        self.regul = 0.1 * self.F.trace().item() / self.d + 1e-6


def case(name) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


def mat(name, rep):
    key = (name, rep)
    if key not in _MATS:
        cs = case(name)
        _MATS[key] = FIM(cs.model, cs.loader, rep, variant=cs.variant)
    return _MATS[key]


def expected(name, rep) -> torch.Tensor:
    """The part of the oracle's FIM that ``rep`` represents."""
    return project(name, rep, case(name).F)


def project(name, rep, F) -> torch.Tensor:
    """The part of the dense (d, d) ``F`` that ``rep`` keeps."""
    if rep is PMatDiag:
        return torch.diag(torch.diagonal(F))
    if rep is PMatBlockDiag:
        lc = mat(name, rep).layer_collection
        mask = torch.zeros_like(F, dtype=torch.bool)
        for lname, layer in lc.layers.items():
            s = lc.p_pos[lname]
            mask[s : s + layer.numel(), s : s + layer.numel()] = True
        return torch.where(mask, F, torch.zeros_like(F))
    return F


def pvec(M, flat) -> PVector:
    return PVector(M.layer_collection, vector_repr=flat.clone())


def assert_no_closed_form(fn):
    with pytest.raises(NotImplementedError) as e:
        fn()
    msg = str(e.value)
    assert "instead" in msg and "PMat" in msg, f"no alternative named in: {msg!r}"


def value_or_no_closed_form(fn, check):
    """Either the operation works (``check`` its result) or it raises NotImplementedError
    naming an alternative. Any other exception (e.g. a bare TypeError) fails."""
    try:
        out = fn()
    except NotImplementedError as e:
        msg = str(e)
        assert "instead" in msg and "PMat" in msg, f"no alternative named in: {msg!r}"
        return
    check(out)


pm = pytest.mark.parametrize


models = pm("name", ALL)
reps = pm("rep", REPS, ids=REP_IDS)


# ------------------------------------------------------------------------------------------
# sanity of the setup: the oracle's FIM is not trivial for any model
@models
def test_oracle_fim_nontrivial(name):
    F = case(name).F
    assert torch.isfinite(F).all()
    assert F.trace() > 0
    # at least two layers contribute (the zoo has >= 2 parametrised layers per model)
    lc = mat(name, PMatDiag).layer_collection
    assert len(lc.layers) >= 2
    assert lc.numel() == F.shape[0]


# ------------------------------------------------------------------------------------------
# operations every representation has
@models
@reps
def test_mv(name, rep):
    cs, M = case(name), mat(name, rep)
    out = M.mv(pvec(M, cs.v))
    assert isinstance(out, PVector)
    assert out.layer_collection == M.layer_collection
    assert rel(out.to_torch(), expected(name, rep) @ cs.v) <= RTOL


@models
@reps
def test_vTMv(name, rep):
    cs, M = case(name), mat(name, rep)
    got = M.vTMv(pvec(M, cs.v))
    assert got.dim() == 0
    assert rel(got, cs.v @ expected(name, rep) @ cs.v) <= RTOL


@models
@reps
def test_trace(name, rep):
    M = mat(name, rep)
    assert rel(M.trace(), torch.trace(expected(name, rep))) <= RTOL


@models
@reps
def test_get_diag(name, rep):
    M = mat(name, rep)
    diag = M.get_diag()
    assert diag.shape == (case(name).d,)
    assert rel(diag, torch.diagonal(expected(name, rep))) <= RTOL


@models
@reps
def test_size(name, rep):
    M, d = mat(name, rep), case(name).d
    assert tuple(M.size()) == (d, d)
    assert M.size(0) == d and M.size(1) == d


@models
@pm("rep", DENSE_LIKE, ids=[r.__name__ for r in DENSE_LIKE])
def test_to_torch(name, rep):
    M = mat(name, rep)
    T = M.to_torch()
    assert T.shape == (case(name).d,) * 2 and T.dtype == torch.float64
    assert rel(T, expected(name, rep)) <= RTOL


@models
@pm("rep", DENSE_LIKE, ids=[r.__name__ for r in DENSE_LIKE])
def test_frobenius_norm(name, rep):
    M = mat(name, rep)
    assert rel(M.frobenius_norm(), torch.linalg.matrix_norm(expected(name, rep))) <= RTOL


# ------------------------------------------------------------------------------------------
# solve / inverse
@models
@pm("rep", DENSE_LIKE, ids=[r.__name__ for r in DENSE_LIKE])
def test_solve(name, rep):
    """x = M.solve(v, regul) satisfies (M + regul I) x = v."""
    cs, M = case(name), mat(name, rep)
    E = expected(name, rep)
    A = E + cs.regul * torch.eye(cs.d, dtype=E.dtype)
    x = M.solve(pvec(M, cs.v), regul=cs.regul)
    assert isinstance(x, PVector)
    x = x.to_torch()
    assert rel(A @ x, cs.v) <= RTOL  # residual
    assert rel(x, torch.linalg.solve(A, cs.v)) <= RTOL  # forward error


@models
def test_implicit_cg_solve(name):
    """PMatImplicit.solve is conjugate gradients: (F + regul I) x = v to ~1e-8.

    Each CG step is a pass over the data, so this runs on the first batch alone (its own
    oracle), with a damping of the order of the mean eigenvalue.
    """
    cs = case(name)
    first = cs.batches[:1]
    F = oracle.fim_dense(cs.model, first, cs.variant)
    regul = F.trace().item() / cs.d + 1e-6
    M = FIM(cs.model, loader_of(first), PMatImplicit, variant=cs.variant)
    A = F + regul * torch.eye(cs.d, dtype=F.dtype)
    x = M.solve(pvec(M, cs.v), regul=regul, tol=1e-10)
    assert isinstance(x, PVector)
    x = x.to_torch()
    assert rel(A @ x, cs.v) <= CG_RTOL
    assert rel(x, torch.linalg.solve(A, cs.v)) <= CG_RTOL


@models
@pm("rep", [PMatDense, PMatDiag, PMatBlockDiag], ids=["PMatDense", "PMatDiag", "PMatBlockDiag"])
def test_inverse(name, rep):
    cs, M = case(name), mat(name, rep)
    E = expected(name, rep)
    A = E + cs.regul * torch.eye(cs.d, dtype=E.dtype)
    inv = M.inverse(regul=cs.regul)
    assert type(inv) is rep
    assert rel(inv.to_torch(), torch.linalg.inv(A)) <= RTOL
    # the inverse is a matrix of the same representation: its mv is A^{-1} v
    assert rel(inv.mv(pvec(M, cs.v)).to_torch(), torch.linalg.solve(A, cs.v)) <= RTOL


# ------------------------------------------------------------------------------------------
# arithmetic: +, -, scalar *
def other(name, rep):
    """A second matrix of the same representation on the same layers: the regression FIM."""
    key = (name, rep, "regression")
    if key not in _MATS:
        cs = case(name)
        _MATS[key] = FIM(cs.model, cs.loader, rep, variant="regression")
    return _MATS[key]


def expected_other(name, rep) -> torch.Tensor:
    cs = case(name)
    if not hasattr(cs, "F_reg"):
        cs.F_reg = oracle.fim_dense(cs.model, cs.batches, "regression")
    return project(name, rep, cs.F_reg)


def _check_combination(name, rep, want):
    cs, M = case(name), mat(name, rep)
    scale = expected(name, rep).norm() + expected_other(name, rep).norm()

    def check(S):
        assert type(S) is rep
        if rep is PMatImplicit:
            v = pvec(M, cs.v)
            assert (S.vTMv(v) - cs.v @ want @ cs.v).abs() <= RTOL * (cs.v @ cs.v) * scale
            assert (S.mv(v).to_torch() - want @ cs.v).norm() <= RTOL * cs.v.norm() * scale
        else:
            assert (S.to_torch() - want).norm() <= RTOL * scale

    return check


@models
@reps
def test_add(name, rep):
    M, R = mat(name, rep), other(name, rep)
    want = expected(name, rep) + expected_other(name, rep)
    value_or_no_closed_form(lambda: M + R, _check_combination(name, rep, want))


def test_lowrank_sum_of_different_sizes():
    """J_1^T J_1 / n_1 + J_2^T J_2 / n_2 holds for any n_1, n_2 (and a sum of sums)."""
    model, batches, c = make("linear", n=10)
    variant = variant_of(c)
    first, last = batches[:1], batches[1:]
    A = FIM(model, loader_of(first), PMatLowRank, variant=variant)
    B = FIM(model, loader_of(last), PMatLowRank, variant=variant)
    assert A.n != B.n
    FA, FB = oracle.fim_dense(model, first, variant), oracle.fim_dense(model, last, variant)
    assert rel((A + B).to_torch(), FA + FB) < 1e-12
    assert rel(((A + A) + B).to_torch(), 2 * FA + FB) < 1e-12


@models
@reps
def test_sub(name, rep):
    M, R = mat(name, rep), other(name, rep)
    want = expected(name, rep) - expected_other(name, rep)
    value_or_no_closed_form(lambda: M - R, _check_combination(name, rep, want))


@models
@reps
@pm("x", [2.5, 0.25])
def test_scalar_mul(name, rep, x):
    cs, M = case(name), mat(name, rep)
    E = expected(name, rep)

    def check(S):
        assert type(S) is rep
        if rep is PMatImplicit:
            assert rel(S.vTMv(pvec(M, cs.v)), x * (cs.v @ E @ cs.v)) <= RTOL
        else:
            assert rel(S.to_torch(), x * E) <= RTOL
            assert rel((M * x).to_torch(), x * E) <= RTOL  # both sides

    value_or_no_closed_form(lambda: x * M, check)


@models
@pm("rep", [PMatDense, PMatDiag, PMatBlockDiag], ids=["PMatDense", "PMatDiag", "PMatBlockDiag"])
def test_negative_scalar_mul(name, rep):
    M = mat(name, rep)
    assert rel((-2.0 * M).to_torch(), -2.0 * expected(name, rep)) <= RTOL


def test_lowrank_negative_scalar_refused():
    """J^T J / n scaled by x < 0 is not PSD: PMatLowRank refuses with a reason."""
    M = mat("linear", PMatLowRank)
    with pytest.raises(ValueError, match="x >= 0"):
        -1.0 * M


# ------------------------------------------------------------------------------------------
# eigendecompositions (Dense, LowRank)
@models
def test_dense_eigendecomposition(name):
    M, F = mat(name, PMatDense), case(name).F
    evals, evecs = M.compute_eigendecomposition()
    ref = torch.linalg.eigvalsh(F)
    scale = ref.abs().max()
    assert evals.shape == ref.shape
    assert (evals - ref).abs().max() <= RTOL * scale
    assert rel(evecs @ torch.diag(evals) @ evecs.t(), F) <= RTOL
    eye = torch.eye(evecs.shape[1], dtype=evecs.dtype)
    assert (evecs.t() @ evecs - eye).abs().max() <= RTOL
    got2 = M.get_eigendecomposition()
    assert torch.equal(got2[0], evals) and torch.equal(got2[1], evecs)


@models
def test_lowrank_eigendecomposition(name):
    M, F = mat(name, PMatLowRank), case(name).F
    evals, evecs = M.compute_eigendecomposition()
    r = evals.shape[0]
    assert evecs.shape == (F.shape[0], r)
    assert r <= min(F.shape[0], case(name).c * 11)
    ref = torch.linalg.eigvalsh(F)[-r:]  # the r largest, ascending
    scale = ref.abs().max()
    assert (evals - ref).abs().max() <= RTOL * scale
    assert rel(evecs @ torch.diag(evals) @ evecs.t(), F) <= RTOL
    eye = torch.eye(r, dtype=evecs.dtype)
    assert (evecs.t() @ evecs - eye).abs().max() <= RTOL


# ------------------------------------------------------------------------------------------
# what has no closed form
@models
def test_implicit_no_closed_form(name):
    M = mat(name, PMatImplicit)
    assert_no_closed_form(M.to_torch)
    assert_no_closed_form(M.frobenius_norm)
    assert_no_closed_form(lambda: M.inverse(regul=1e-3))


@models
def test_lowrank_inverse_no_closed_form(name):
    M = mat(name, PMatLowRank)
    assert_no_closed_form(lambda: M.inverse(regul=1e-3))


def test_combining_two_representations_refused():
    D, G = mat("linear", PMatDense), mat("linear", PMatDiag)
    with pytest.raises(TypeError, match="convert both to one representation"):
        D + G
    with pytest.raises(TypeError, match="convert both to one representation"):
        G - D


# ------------------------------------------------------------------------------------------
# consistency of the approximations with the exact matrix, on the same model
@models
def test_approximations_agree_with_dense(name):
    D = mat(name, PMatDense).to_torch()
    assert rel(mat(name, PMatDiag).get_diag(), torch.diagonal(D)) <= RTOL
    assert rel(mat(name, PMatBlockDiag).to_torch(), expected(name, PMatBlockDiag)) <= RTOL
    assert rel(mat(name, PMatLowRank).to_torch(), D) <= RTOL


def test_forward_mode_takes_the_tangents_without_a_copy():
    """The tangents of a J v pass (slices of one flat vector) are laid out once like the
    parameters, each in its own storage, which forward-mode AD takes as they are: no copy
    into fresh zeros on every batch."""
    from torch.autograd import forward_ad

    from nngeo_dist.generator import Generator

    model, batches, _ = make("conv2d", n=4, batch_size=2, seed=0)
    gen = Generator(model)
    fm = gen.functional
    flat = torch.randn(sum(p.numel() for p in fm.params), dtype=torch.float64)
    views = [v.view_as(p) for v, p in zip(torch.split(flat, [p.numel() for p in fm.params]), fm.params)]
    seen, jvp = [], fm.jvp
    fm.jvp = lambda batch, tangents: (seen.append(tangents), jvp(batch, tangents))[1]
    assert len(list(gen.jvp_batches(batches, views))) == len(batches)
    assert all(t is s for t, s in zip(seen[0], seen[-1]))  # made once, not per batch
    for p, v, t in zip(fm.params, views, seen[0]):
        assert torch.equal(t, v) and t.stride() == p.stride()
        with forward_ad.dual_level():
            assert forward_ad.unpack_dual(forward_ad.make_dual(p.detach(), t)).tangent.data_ptr() == t.data_ptr()
            # a slice itself is copied (why they are laid out again)
            assert forward_ad.unpack_dual(forward_ad.make_dual(p.detach(), v)).tangent.data_ptr() != v.data_ptr()


def _jv_against_oracle(gen, cs) -> float:
    J = oracle.per_example_jacobian(cs.model, None, cs.batches)  # (c, n, d)
    shapes = [p.shape for p in gen.functional.params]
    tangents = [t.view(s) for t, s in zip(torch.split(cs.v, [s.numel() for s in shapes]), shapes)]
    jv = torch.cat([jv for _, _, jv in gen.jvp_batches(cs.batches, tangents)])
    return rel(jv, (J @ cs.v).t())


@pytest.mark.parametrize("name", ALL)
def test_jvp_exact_when_every_layer_is_taken_for_a_first_layer(name):
    """A wrong record (every layer taken for one whose inputs carry no tangent) costs
    time, never exactness: the tangent torch propagates through a layer's inputs is kept
    and the parameters' is added."""
    from nngeo_dist.generator import Generator

    cs = case(name)
    gen = Generator(cs.model)
    gen.functional.constant_inputs = set(gen.functional.owners)
    assert _jv_against_oracle(gen, cs) < RTOL


@pytest.mark.parametrize("name", ALL)
def test_jvp_with_tangents_given_at_the_first_layers_outputs(name):
    """J v batch by batch against the oracle's Jacobian: the model's first batch finds the
    layers whose inputs carry no tangent, the later ones (and later passes) give those
    layers' outputs their tangent directly (one product instead of torch's two)."""
    from nngeo_dist.generator import Generator, functional

    cs = case(name)
    functional._CONSTANT_INPUTS.pop(cs.model, None)
    gen = Generator(cs.model)
    assert _jv_against_oracle(gen, cs) < RTOL
    assert len(cs.batches) >= 2 and gen.functional.constant_inputs  # both routes ran


def test_jvp_keeps_the_tangent_of_a_parameter_read_outside_its_layer():
    """A function that also reads the first layer's weight itself (outside the layer,
    whose output tangent we compute): that use keeps its tangent, in every batch."""
    from nngeo_dist.generator import Generator, functional

    model, batches, _ = make("linear", n=11, batch_size=4, seed=0)
    functional._CONSTANT_INPUTS.pop(model, None)

    def function(x, y):
        return model(x) + (model[0].weight[:3, 0] ** 2)[None, :] * x[:, :1]

    gen = Generator(model, function)
    J = oracle.per_example_jacobian(model, function, batches)
    v = torch.linspace(-1, 1, J.shape[2], dtype=torch.float64)
    shapes = [p.shape for p in gen.functional.params]
    tangents = [t.view(s) for t, s in zip(torch.split(v, [s.numel() for s in shapes]), shapes)]
    jv = torch.cat([jv for _, _, jv in gen.jvp_batches(batches, tangents)])
    assert model[0] in gen.functional.constant_inputs
    assert rel(jv, (J @ v).t()) < RTOL
