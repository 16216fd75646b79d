"""More nngeometry 0.4 call forms that user code relies on (DESIGN.md §2: code ports by
changing imports), each against nngeometry 0.4 itself on the same model and data:

- ``PMatDense.project_to_diag / project_from_diag`` (coordinates in the eigenbasis);
- the layers of ``LayerCollection.layers``: ``.weight.size``, ``.bias`` (None without a
  bias), ``numel()``; ``LayerCollection.parameters / named_parameters`` given 0.4's map
  layer name -> module;
- an FVector given flat, (c n,), as 0.4's ``FMatDense.vTMv`` and ``PFMapDense.vjp`` read it;
- ``impl=`` on ``PMatKFAC.compute_eigendecomposition`` and ``FMatDense.compute_eigendecomposition``
  (0.4's values accepted, others refused by name);
- ``split_weight_bias`` on ``PMatKFAC.get_diag``, ``PMatEKFAC.to_torch`` and ``get_KFE``;
- ``PFMapDense.iter_by_module``;
- ``solve(J)`` / ``solvePFMap(J)`` for a push-forward J, row by row.

Oracle: nngeometry 0.4 (float64, relative error <= 1e-10); eigenvectors are compared
through what does not depend on their signs or on the basis chosen within a repeated
eigenvalue (the matrices they rebuild, coordinates weighted by distinct eigenvalues).
"""
from __future__ import annotations

import pytest
import torch

import nngeo_dist.object as O
from nngeo_dist import FIM, GramMatrix, Jacobian, LayerCollection

from checks import float64_default, rel  # noqa: F401 (an autouse fixture)

try:
    from models import NNGEOMETRY_SUPPORTED, fresh_pair, make
except ImportError:  # tests/ imported as a package
    from tests.models import NNGEOMETRY_SUPPORTED, fresh_pair, make

ng = pytest.importorskip("nngeometry")
from nngeometry import GramMatrix as NGGramMatrix  # noqa: E402
from nngeometry import Jacobian as NGJacobian  # noqa: E402
from nngeometry.layercollection import LayerCollection as NGLayerCollection  # noqa: E402
from nngeometry.metrics import FIM as NGFIM  # noqa: E402
from nngeometry.object import FVector as NGFVector  # noqa: E402
from nngeometry.object import PMatBlockDiag as NGBlockDiag  # noqa: E402
from nngeometry.object import PMatDense as NGDense  # noqa: E402
from nngeometry.object import PMatDiag as NGDiag  # noqa: E402
from nngeometry.object import PMatEKFAC as NGEKFAC  # noqa: E402
from nngeometry.object import PMatKFAC as NGKFAC  # noqa: E402
from nngeometry.object import PMatQuasiDiag as NGQuasiDiag  # noqa: E402
from nngeometry.object import PVector as NGPVector  # noqa: E402

RTOL = 1e-10
pm = pytest.mark.parametrize


def fresh(name="linear"):
    """(our model, nngeometry's model, loader): see :func:`models.fresh_pair`."""
    return fresh_pair(name)[:3]


def vector_pair(lc, ng_lc, seed=3):
    """The same random vector as our PVector and as nngeometry's."""
    x = torch.randn(lc.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return O.PVector(lc, vector_repr=x.clone()), NGPVector(ng_lc, vector_repr=x.clone())


def distinct(evals, rtol=1e-6):
    """Mask of the eigenvalues (ascending) that are nonzero and not repeated: there the
    eigenvector is defined up to its sign."""
    scale = evals.abs().max()
    gap_lo = torch.cat([evals.new_full((1,), float("inf")), evals[1:] - evals[:-1]])
    gap_hi = torch.cat([evals[1:] - evals[:-1], evals.new_full((1,), float("inf"))])
    return (evals > rtol * scale) & (gap_lo > rtol * scale) & (gap_hi > rtol * scale)


# ------------------------------------------------------------------------------------------
# PMatDense.project_to_diag / project_from_diag


@pm("name", ["linear", "conv2d"])
def test_dense_project_to_diag_as_nngeometry(name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatDense), NGFIM(theirs, loader, NGDense)
    v, ng_v = vector_pair(F.layer_collection, ng_F.generator.layer_collection)
    coords = F.project_to_diag(v)  # ours computes the eigendecomposition on first need
    ng_F.compute_eigendecomposition()
    ng_coords = ng_F.project_to_diag(ng_v)
    evals, ng_evals = F.get_eigendecomposition()[0], ng_F.get_eigendecomposition()[0]
    assert coords.shape == ng_coords.shape == (F.size(0),)
    # both ascending: the same coordinate on each distinct eigenvalue, up to its sign
    keep = distinct(ng_evals)
    assert int(keep.sum()) >= 3
    assert rel(coords[keep].abs(), ng_coords[keep].abs()) <= 1e-8
    # and what does not depend on the basis: M v and (M + r I)^{-1} v rebuilt from them
    back = F.project_from_diag(evals * coords)
    assert isinstance(back, O.PVector) and back.layer_collection == F.layer_collection
    assert rel(back.to_torch(), ng_F.project_from_diag(ng_evals * ng_coords).to_torch()) <= RTOL
    assert rel(back.to_torch(), F.mv(v).to_torch()) <= RTOL
    solved = F.project_from_diag(coords / (evals + 1e-3)).to_torch()
    assert rel(solved, ng_F.solve(ng_v, regul=1e-3, impl="eigendecomposition").to_torch()) <= RTOL
    assert rel(F.project_from_diag(coords).to_torch(), v.to_torch()) <= RTOL  # a round trip
    with pytest.raises(ValueError, match=r"expected eigenbasis coordinates of shape"):
        F.project_from_diag(coords[:-1])


# ------------------------------------------------------------------------------------------
# the layers of a LayerCollection


@pm("name", sorted(NNGEOMETRY_SUPPORTED))
def test_layers_expose_nngeometry_parameter_shapes(name):
    model, _, _ = make(name)
    lc, ng_lc = LayerCollection.from_model(model), NGLayerCollection.from_model(model)
    assert list(lc.layers) == list(ng_lc.layers)
    modules = dict(model.named_modules())
    for lid, ng_layer in ng_lc.layers.items():
        layer = lc.layers[lid]
        assert layer.weight.size == tuple(modules[lid].weight.shape)
        if layer.kind == "ConvTranspose2d":
            # 0.4 gives (out, in, kh, kw), not the module's (in, out, kh, kw): ours is the
            # module's (and the flat order both use is that of the module's weight)
            assert layer.weight.size == tuple(ng_layer.weight.size[i] for i in (1, 0, 2, 3))
        else:
            assert layer.weight.size == ng_layer.weight.size
        assert layer.weight.numel() == ng_layer.weight.numel()
        assert (layer.bias is None) == (ng_layer.bias is None)
        if ng_layer.bias is not None:
            assert layer.bias.size == ng_layer.bias.size and layer.bias.numel() == ng_layer.bias.numel()
            assert layer.bias  # 0.4 code tests `if layer.bias:`
        assert layer.numel() == ng_layer.numel()
        assert lc.p_pos[lid] == ng_lc.p_pos[lid]
    # 0.4's form: parameters / named_parameters of the map layer name -> module
    l_to_m, _ = ng_lc.get_layerid_module_maps(model)
    ours_p, theirs_p = lc.parameters(l_to_m), list(ng_lc.parameters(l_to_m))
    assert len(ours_p) == len(theirs_p) and all(a is b for a, b in zip(ours_p, theirs_p))
    assert all(a is b for a, b in zip(lc.parameters(model), theirs_p))
    named = lc.named_parameters(l_to_m)
    assert [p for _, p in named] == ours_p
    assert [n for n, _ in named] == [n for n, _ in lc.named_parameters(model)]


def test_layer_shapes_drive_nngeometry_style_code():
    """0.4 user code builds per-layer tensors from layer.weight.size / layer.bias."""
    model, _, _ = make("linear")
    lc = LayerCollection.from_model(model)
    d = {}
    for lid, layer in lc.layers.items():
        w = torch.ones(layer.weight.size)
        d[lid] = (w, torch.zeros(layer.bias.size)) if layer.bias is not None else (w,)
    v = O.PVector(lc, dict_repr=d)
    assert v.to_torch().shape == (lc.numel(),)
    assert torch.equal(O.PVector(lc, vector_repr=v.to_torch()).to_dict()[next(iter(d))][0], d[next(iter(d))][0])


# ------------------------------------------------------------------------------------------
# a flat (c n,) FVector


def test_flat_fvector_as_nngeometry():
    ours, theirs, loader = fresh("linear")
    K, ng_K = GramMatrix(ours, loader), NGGramMatrix(theirs, loader)
    J, ng_J = Jacobian(ours, loader), NGJacobian(theirs, loader)
    c, n = K.size(0), K.size(1)
    u = torch.randn(c * n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    flat, ng_flat = O.FVector(u.clone()), NGFVector(vector_repr=u.clone())
    assert flat.vector_repr is flat.to_torch() and flat.size() == (c * n,)
    # 0.4 reads a flat FVector as (c, n) output-major
    assert rel(K.vTMv(flat), ng_K.vTMv(ng_flat)) <= RTOL
    assert rel(J.vjp(flat).to_torch(), ng_J.vjp(ng_flat).to_torch()) <= RTOL
    assert rel(J.transpose().mv(flat).to_torch(), ng_J.vjp(ng_flat).to_torch()) <= RTOL
    # and as the (c, n) one everywhere (0.4's FMatDense.mv is broken: ours gives (c, n))
    square = O.FVector(u.view(c, n))
    assert torch.equal(K.mv(flat).to_torch(), K.mv(square).to_torch())
    assert rel(K.vTMv(square), ng_K.vTMv(NGFVector(vector_repr=u.view(c, n)))) <= RTOL
    with pytest.raises(ValueError, match=rf"expected an FVector of shape \({c}, {n}\) \(all examples, "
                                         rf"or flat \({c * n},\)\)"):
        K.vTMv(O.FVector(u[:-1]))
    with pytest.raises(ValueError, match=r"an FVector is \(c, n\), or flat \(c n,\)"):
        O.FVector(u.view(c, n, 1))


# ------------------------------------------------------------------------------------------
# impl= on eigendecompositions


@pm("name", ["linear", "conv2d"])
def test_kfac_eigendecomposition_impl_as_nngeometry(name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatKFAC), NGFIM(theirs, loader, NGKFAC)
    evals, evecs = F.compute_eigendecomposition(impl="eigh")
    ng_F.compute_eigendecomposition(impl="eigh")
    ng_evals, ng_evecs = ng_F.get_eigendecomposition()
    assert list(evals) == list(ng_evals) and list(evecs) == list(ng_evecs)
    for lid in ng_evals:
        (la, lg), (ua, ug) = evals[lid], evecs[lid]
        (nla, nlg), (nua, nug) = ng_evals[lid], ng_evecs[lid]
        assert la.shape == nla.shape and lg.shape == nlg.shape and ua.shape == nua.shape
        # the factors' scales split differently (README), their products do not
        assert rel(torch.outer(lg, la), torch.outer(nlg, nla)) <= RTOL
        ours_block = torch.kron((ug * lg) @ ug.t(), (ua * la) @ ua.t())
        assert rel(ours_block, torch.kron((nug * nlg) @ nug.t(), (nua * nla) @ nua.t())) <= RTOL
    # 0.4's positional form: compute_eigendecomposition("eigh")
    again = F.compute_eigendecomposition("eigh")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again[0].values(), evals.values()))
    with pytest.raises(ValueError, match=r"PMatKFAC.compute_eigendecomposition: impl='svd' is not "
                                         r"supported; accepted: 'eigh'"):
        F.compute_eigendecomposition(impl="svd")


@pm("impl", ["eigh", "svd"])
def test_gram_eigendecomposition_impl_as_nngeometry(impl):
    ours, theirs, loader = fresh("linear")
    K, ng_K = GramMatrix(ours, loader), NGGramMatrix(theirs, loader)
    evals, evecs = K.compute_eigendecomposition(impl=impl)
    assert bool((evals[1:] >= evals[:-1]).all())  # ours: ascending whatever impl
    ng_K.compute_eigendecomposition(impl=impl)
    ng_evals, ng_evecs = ng_K.get_eigendecomposition()
    assert rel(evals, torch.sort(ng_evals).values) <= 1e-9
    assert rel(evecs @ torch.diag(evals) @ evecs.t(), ng_evecs @ torch.diag(ng_evals) @ ng_evecs.t()) <= 1e-9
    with pytest.raises(ValueError, match=r"FMatDense.compute_eigendecomposition: impl='qr' is not "
                                         r"supported; accepted: 'eigh', 'svd'"):
        K.compute_eigendecomposition(impl="qr")


# ------------------------------------------------------------------------------------------
# split_weight_bias on KFAC's get_diag, EKFAC's to_torch and get_KFE


@pm("name", ["linear", "linear_nobias", "conv2d"])
def test_kfac_get_diag_split_weight_bias_as_nngeometry(name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatKFAC), NGFIM(theirs, loader, NGKFAC)
    for split in (True, False):
        got = F.get_diag(split_weight_bias=split)
        assert rel(got, ng_F.get_diag(split_weight_bias=split)) <= RTOL
        assert torch.equal(got, torch.diagonal(F.to_torch(split_weight_bias=split)))
    assert torch.equal(F.get_diag(), F.get_diag(split_weight_bias=True))


@pm("update", [False, True])
@pm("name", ["linear", "linear_nobias", "conv2d"])
def test_ekfac_split_weight_bias_as_nngeometry(name, update):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatEKFAC), NGFIM(theirs, loader, NGEKFAC)
    if update:
        F.update_diag(loader)
        ng_F.update_diag(loader)
    D = torch.cat([d.reshape(-1) for d in F.data[1].values()])
    starts = [F.layer_collection.p_pos[n] for n in F.layer_collection.layers] + [F.size(0)]
    for split in (True, False):
        M = F.to_torch(split_weight_bias=split)
        assert rel(M, ng_F.to_torch(split_weight_bias=split)) <= RTOL
        # the eigenbasis rebuilds that matrix, whatever the eigenvectors' signs
        kfe = F.get_KFE(split_weight_bias=split)
        for (lid, U), s, e in zip(kfe.items(), starts, starts[1:]):
            assert rel(U.t() @ U, torch.eye(e - s)) <= RTOL
            assert rel((U * D[s:e]) @ U.t(), M[s:e, s:e]) <= RTOL
            ng_U = ng_F.get_KFE(split_weight_bias=split)[lid]
            assert rel(U @ U.t(), ng_U @ ng_U.t()) <= RTOL and U.shape == ng_U.shape
    assert torch.equal(F.to_torch(), F.to_torch(split_weight_bias=True))


# ------------------------------------------------------------------------------------------
# PFMapDense.iter_by_module


@pm("name", ["linear", "linear_nobias", "conv2d"])
def test_iter_by_module_as_nngeometry(name):
    ours, theirs, loader = fresh(name)
    J, ng_J = Jacobian(ours, loader), NGJacobian(theirs, loader)
    got, want = list(J.iter_by_module()), list(ng_J.iter_by_module())
    assert [k for k, _ in got] == [k for k, _ in want]
    for (_, ts), (_, ng_ts) in zip(got, want):
        assert len(ts) == len(ng_ts)
        for a, b in zip(ts, ng_ts):
            assert a.shape == b.shape and rel(a, b) <= RTOL
            assert a.data_ptr() >= J.data.data_ptr()  # views of J, not copies
    flat = torch.cat([t.reshape(*J.data.shape[:2], -1) for _, ts in got for t in ts], dim=2)
    assert torch.equal(flat, J.data)


# ------------------------------------------------------------------------------------------
# solve(J) / solvePFMap(J)


SOLVERS = {"PMatDense": NGDense, "PMatDiag": NGDiag, "PMatBlockDiag": NGBlockDiag,
           "PMatQuasiDiag": NGQuasiDiag, "PMatKFAC": NGKFAC, "PMatEKFAC": NGEKFAC}


@pm("rep", list(SOLVERS))
@pm("name", ["linear", "conv2d"])
def test_solve_push_forward_as_nngeometry(rep, name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, getattr(O, rep)), NGFIM(theirs, loader, SOLVERS[rep])
    J, ng_J = Jacobian(ours, loader), NGJacobian(theirs, loader)
    want = ng_F.solve(ng_J, regul=1e-3).to_torch()
    for got in (F.solve(J, regul=1e-3), F.solvePFMap(J, regul=1e-3), F.solve(J, 1e-3)):
        assert isinstance(got, O.PFMapDense) and got.layer_collection == J.layer_collection
        assert got.size() == J.size() and rel(got.to_torch(), want) <= RTOL
    assert rel(F.solvePFMap(J, 1e-3, "default").to_torch(), ng_F.solvePFMap(ng_J, 1e-3, "default").to_torch()) <= RTOL
    # a vector is still solved as one
    v = O.PVector(F.layer_collection, vector_repr=J.data[0, 0].clone())
    assert rel(F.solve(v, regul=1e-3).to_torch(), want[0, 0]) <= RTOL
    with pytest.raises(ValueError, match=r"impl='cg' is not supported"):
        F.solvePFMap(J, regul=1e-3, impl="cg")


def test_solve_push_forward_keeps_each_solve_arguments():
    """solve(J, ...) passes its own arguments (impl, use_pi) to every row's solve."""
    model, _, loader = fresh()
    J = Jacobian(model, loader)
    rows = J.data.reshape(-1, J.data.shape[-1])
    for F, kw in ((FIM(model, loader, O.PMatDense), {"impl": "eigendecomposition"}),
                  (FIM(model, loader, O.PMatLowRank), {"impl": "svd"}),
                  (FIM(model, loader, O.PMatKFAC), {"use_pi": False})):
        got = F.solve(J, regul=1e-3, **kw).to_torch().reshape(rows.shape)
        for r, g in zip(rows, got):
            want = F.solve(O.PVector(F.layer_collection, vector_repr=r), regul=1e-3, **kw).to_torch()
            assert rel(g, want) <= 1e-12  # PMatDense solves all rows with one factorisation
    with pytest.raises(ValueError, match=r"PMatKFAC.solve: impl='svd' is not supported"):
        FIM(model, loader, O.PMatKFAC).solve(J, regul=1e-3, impl="svd")
