"""nngeometry 0.4 names and behaviours that user code relies on (DESIGN.md §2: code ports
by changing imports):

- the PFMap* names, random_pvector / random_pvector_dict / random_fvector,
  PVector.vector_repr / dict_repr, PMat*.mm, pickling of the stored representations,
  eigendecompositions (exact where trivial, NotImplementedError naming what to use
  elsewhere), and the Monte-Carlo variants classif_logsoftmax and segmentation_logits;
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

Oracles: nngeometry 0.4 itself on the same model and data (float64, relative error
<= 1e-10, or the same draws for the same seed), dense float64 products of to_torch(),
torch.linalg.eigh, and for pickling the object before the round trip; eigenvectors are
compared through what does not depend on their signs or on the basis chosen within a
repeated eigenvalue (the matrices they rebuild, coordinates weighted by distinct
eigenvalues).
"""
from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import nngeo_dist.object as O
import nngeo_dist.object.map as map_module
import nngeo_dist.object.vector as vector_module
from nngeo_dist import FIM, FIM_MonteCarlo, GramMatrix, Jacobian, LayerCollection

from checks import default_dtype, float64_default, rel  # noqa: F401 (an autouse fixture)

try:
    from dist_harness import run_ranks
    from models import NNGEOMETRY_SUPPORTED, fresh_pair, loader_of, make
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import run_ranks
    from tests.models import NNGEOMETRY_SUPPORTED, fresh_pair, loader_of, make

ng = pytest.importorskip("nngeometry")
import nngeometry.object.vector as ng_vector  # noqa: E402
from nngeometry import GramMatrix as NGGramMatrix  # noqa: E402
from nngeometry import Jacobian as NGJacobian  # noqa: E402
from nngeometry.layercollection import LayerCollection as NGLayerCollection  # noqa: E402
from nngeometry.metrics import FIM as NGFIM  # noqa: E402
from nngeometry.metrics import FIM_MonteCarlo as NGFIM_MonteCarlo  # noqa: E402
from nngeometry.object import FVector as NGFVector  # noqa: E402
from nngeometry.object import PMatBlockDiag as NGBlockDiag  # noqa: E402
from nngeometry.object import PMatDense as NGDense  # noqa: E402
from nngeometry.object import PMatDiag as NGDiag  # noqa: E402
from nngeometry.object import PMatEKFAC as NGEKFAC  # noqa: E402
from nngeometry.object import PMatKFAC as NGKFAC  # noqa: E402
from nngeometry.object import PMatLowRank as NGLowRank  # noqa: E402
from nngeometry.object import PMatQuasiDiag as NGQuasiDiag  # noqa: E402
from nngeometry.object import PVector as NGPVector  # noqa: E402

RTOL = 1e-10
pm = pytest.mark.parametrize


def fresh(name="linear"):
    """(our model, nngeometry's model, loader): see :func:`models.fresh_pair`."""
    return fresh_pair(name)[:3]


# ------------------------------------------------------------------------------------------
# names


def test_pfmap_names_are_the_push_forwards():
    assert O.PFMapDense is O.PushForwardDense and map_module.PFMapDense is O.PushForwardDense
    assert O.PFMapImplicit is O.PushForwardImplicit and map_module.PFMapImplicit is O.PushForwardImplicit
    assert {"PFMapDense", "PFMapImplicit", "random_pvector_dict", "random_fvector"} <= set(O.__all__)
    model, _, loader = fresh()
    assert isinstance(Jacobian(model, loader), O.PFMapDense)


# ------------------------------------------------------------------------------------------
# random vectors: nngeometry's signature, dtype and draws


def collections(name="linear"):
    model, _, _ = make(name)
    return LayerCollection.from_model(model), NGLayerCollection.from_model(model)


@pm("name", ["linear", "conv2d"])
def test_random_pvector_as_nngeometry(name):
    lc, ng_lc = collections(name)
    with default_dtype(torch.float32):  # its dtype is float64 whatever the default
        torch.manual_seed(7)
        ours = O.random_pvector(lc)
        torch.manual_seed(7)
        theirs = ng_vector.random_pvector(ng_lc)
    assert ours.to_torch().dtype == torch.float64 and ours.vector_repr is not None
    assert torch.equal(ours.to_torch(), theirs.to_torch())
    # nngeometry's positional order: (layer_collection, device, dtype)
    torch.manual_seed(7)
    low = O.random_pvector(lc, "cpu", torch.float32)
    torch.manual_seed(7)
    ng_low = ng_vector.random_pvector(ng_lc, "cpu", torch.float32)
    assert low.to_torch().dtype == torch.float32 and low.device.type == "cpu"
    assert torch.equal(low.to_torch(), ng_low.to_torch())
    # our generator= keeps its own stream
    a = O.random_pvector(lc, generator=torch.Generator().manual_seed(3))
    b = O.random_pvector(lc, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.to_torch(), b.to_torch())


@pm("name", ["linear", "linear_nobias", "conv2d"])
def test_random_pvector_dict_as_nngeometry(name):
    lc, ng_lc = collections(name)
    torch.manual_seed(11)
    ours = vector_module.random_pvector_dict(lc)
    torch.manual_seed(11)
    theirs = ng_vector.random_pvector_dict(ng_lc)
    assert ours.vector_repr is None and list(ours.dict_repr) == list(theirs.dict_repr)
    for k, ts in theirs.dict_repr.items():
        assert len(ours.dict_repr[k]) == len(ts)
        for a, b in zip(ours.dict_repr[k], ts):
            assert a.shape == b.shape and torch.equal(a, b)
    with default_dtype(torch.float32):  # torch's default dtype, as nngeometry's
        assert vector_module.random_pvector_dict(lc).to_torch().dtype == torch.float32
    assert vector_module.random_pvector_dict(lc, dtype=torch.float64).to_torch().dtype == torch.float64


def test_random_fvector_as_nngeometry():
    torch.manual_seed(5)
    ours = vector_module.random_fvector(7, 3)
    torch.manual_seed(5)
    theirs = ng_vector.random_fvector(7, 3)
    # nngeometry's layout (n_output, n_samples) is already ours, (c, n)
    assert ours.to_torch().shape == (3, 7)
    assert torch.equal(ours.to_torch(), theirs.to_torch())
    assert vector_module.random_fvector(4).to_torch().shape == (1, 4)


# ------------------------------------------------------------------------------------------
# PVector.vector_repr / dict_repr


def test_vector_and_dict_repr_as_nngeometry():
    model, _, _ = make("linear")
    lc, ng_lc = LayerCollection.from_model(model), NGLayerCollection.from_model(model)
    flat = torch.arange(lc.numel(), dtype=torch.float64)
    v, ng_v = O.PVector(lc, vector_repr=flat), NGPVector(ng_lc, vector_repr=flat)
    assert v.vector_repr is flat and ng_v.vector_repr is flat
    v.to_dict()  # deriving the other form leaves the attributes as nngeometry's
    assert v.dict_repr is None and ng_v.dict_repr is None
    w, ng_w = O.PVector.from_model(model), NGPVector.from_model(model)
    assert w.vector_repr is None and ng_w.vector_repr is None
    assert list(w.dict_repr) == list(ng_w.dict_repr)
    for k, ts in ng_w.dict_repr.items():
        assert all(a is b for a, b in zip(w.dict_repr[k], ts))  # the live parameters
    with pytest.raises(AttributeError):
        v.vector_repr = flat


# ------------------------------------------------------------------------------------------
# mm


MM = {"PMatDense": NGDense, "PMatDiag": NGDiag, "PMatBlockDiag": NGBlockDiag}


@pm("rep", list(MM))
@pm("name", ["linear", "conv2d"])
def test_mm_as_nngeometry_and_dense(rep, name):
    ours, theirs, loader = fresh(name)
    F = FIM(ours, loader, getattr(O, rep))
    G = FIM(ours, loader, getattr(O, rep), variant="regression")
    P = F.mm(G)
    assert type(P) is type(F) and P.layer_collection == F.layer_collection
    want = F.to_torch() @ G.to_torch()
    assert rel(P.to_torch(), want) <= RTOL
    ng_F, ng_G = NGFIM(theirs, loader, MM[rep]), NGFIM(theirs, loader, MM[rep], variant="regression")
    assert rel(P.to_torch(), ng_F.mm(ng_G).to_torch()) <= RTOL


def test_mm_refuses_other_representations():
    model, _, loader = fresh()
    F = FIM(model, loader, O.PMatDense)
    with pytest.raises(TypeError, match="cannot combine PMatDense with PMatDiag"):
        F.mm(FIM(model, loader, O.PMatDiag))
    with pytest.raises(NotImplementedError, match="PMatQuasiDiag has no closed form for mm; use PMatDense"):
        FIM(model, loader, O.PMatQuasiDiag).mm(FIM(model, loader, O.PMatQuasiDiag))


# ------------------------------------------------------------------------------------------
# eigendecompositions


@pm("rep", ["PMatDiag", "PMatBlockDiag"])
@pm("name", ["linear", "conv2d"])
def test_eigendecomposition_exact(rep, name):
    model, _, loader = fresh(name)
    F = FIM(model, loader, getattr(O, rep))
    M = F.to_torch()
    evals, evecs = F.compute_eigendecomposition()
    want = torch.linalg.eigh(M).eigenvalues
    assert evals.shape == want.shape and evecs.shape == M.shape
    assert bool((evals[1:] >= evals[:-1]).all())  # ascending, as PMatDense's
    assert rel(evals, want) <= RTOL
    assert rel(evecs.t() @ evecs, torch.eye(M.shape[0])) <= RTOL
    assert rel(M @ evecs, evecs * evals) <= RTOL
    again = F.get_eigendecomposition()
    assert again[0] is evals and again[1] is evecs


@pm("rep", ["PMatQuasiDiag", "PMatEKFAC", "PMatImplicit"])
def test_eigendecomposition_refused_naming_what_to_use(rep):
    model, _, loader = fresh()
    F = FIM(model, loader, getattr(O, rep))
    for op in ("compute_eigendecomposition", "get_eigendecomposition"):
        with pytest.raises(NotImplementedError, match=f"{rep} has no closed form for {op}; use PMatDense"):
            getattr(F, op)()


# ------------------------------------------------------------------------------------------
# pickling


def _ops(F, v):
    """What each operation gives, or the NotImplementedError it raises."""
    ops = {
        "mv": lambda: F.mv(v).to_torch(),
        "vTMv": lambda: F.vTMv(v),
        "trace": lambda: F.trace(),
        "frobenius_norm": lambda: F.frobenius_norm(),
        "get_diag": lambda: F.get_diag(),
        "to_torch": lambda: F.to_torch(),
        "solve": lambda: F.solve(v, regul=1e-3).to_torch(),
        "inverse": lambda: F.inverse(regul=1e-3).to_torch(),
        "eig": lambda: F.get_eigendecomposition(),
    }
    out = {}
    for k, op in ops.items():
        try:
            out[k] = op()
        except NotImplementedError as e:
            out[k] = str(e)
    return out


def _same(a, b):
    if isinstance(a, tuple) or isinstance(a, dict):
        items = zip(a, b) if isinstance(a, tuple) else ((a[k], b[k]) for k in a)
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in items)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _torch_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


PICKLED = ["PMatDense", "PMatDiag", "PMatBlockDiag", "PMatQuasiDiag", "PMatKFAC", "PMatEKFAC",
           "PMatLowRank", "mixed"]


def _build(rep, model, loader):
    if rep == "mixed":
        return FIM(model, loader, {"Conv2d": O.PMatEKFAC, "default": O.PMatBlockDiag})
    kw = {"update_diag": True} if rep == "PMatEKFAC" else {}
    return FIM(model, loader, getattr(O, rep), **kw)


@pm("rep", PICKLED)
def test_pickle_round_trip(rep):
    model, _, loader = fresh("conv2d")
    F = _build(rep, model, loader)
    v = O.random_pvector(F.layer_collection, generator=torch.Generator().manual_seed(0))
    before = _ops(F, v)
    assert isinstance(before["to_torch"], torch.Tensor)
    for G in (pickle.loads(pickle.dumps(F)), _torch_round_trip(F)):
        assert type(G) is type(F) and G.layer_collection == F.layer_collection
        after = _ops(G, O.PVector(G.layer_collection, vector_repr=v.to_torch()))
        assert after.keys() == before.keys()
        for k in before:
            assert _same(after[k], before[k]), k
        # what nngeometry's stand-in generator keeps
        assert G.generator.layer_collection == F.layer_collection
        assert G.generator.get_device() == F.to_torch().device
        assert _same(_ops(pickle.loads(pickle.dumps(G)), v)["to_torch"], before["to_torch"])


@pm("rep", ["PMatEKFAC", "mixed"])
def test_unpickled_cannot_pass_over_data_again(rep):
    model, _, loader = fresh("conv2d")
    G = pickle.loads(pickle.dumps(_build(rep, model, loader)))
    with pytest.raises(ValueError, match=f"this {type(G).__name__} was unpickled, and its generator "
                                         r"\(the model and function it was computed from\) is not pickled"):
        G.update_diag(loader)


def test_pickle_function_space_objects():
    model, _, loader = fresh()
    for obj in (GramMatrix(model, loader), Jacobian(model, loader), Jacobian(model, loader).transpose()):
        back = pickle.loads(pickle.dumps(obj))
        assert type(back) is type(obj) and torch.equal(back.to_torch(), obj.to_torch())
    u = O.FVector(torch.ones(3, 11))
    J = Jacobian(model, loader)
    assert torch.equal(pickle.loads(pickle.dumps(J.transpose())).mv(u).to_torch(), J.vjp(u).to_torch())


@pm("what", ["PMatImplicit", "PushForwardImplicit"])
def test_pickle_refused_for_implicit(what):
    model, _, loader = fresh()
    obj = (FIM(model, loader, O.PMatImplicit) if what == "PMatImplicit"
           else Jacobian(model, loader, representation=O.PushForwardImplicit))
    with pytest.raises(TypeError, match=f"a {what} holds no numbers, only the model and the data loader"):
        pickle.dumps(obj)


def _pickle_in_a_group(rank, world):
    """Each rank: pickling its part of a sharded object (refused), then the gathered whole."""
    # the parent's default dtype: the zoo's module initialisation draws in it
    torch.set_default_dtype(torch.float64)
    model, batches, _ = make("linear")
    mine = loader_of(batches[rank::world])
    out = {}
    for what, build in (("PMatLowRank", lambda: FIM(model, mine, O.PMatLowRank)),
                        ("FMatDense", lambda: GramMatrix(model, mine)),
                        ("PushForwardDense", lambda: Jacobian(model, mine))):
        obj = build()
        try:
            pickle.dumps(obj)
            out[what] = "pickled"
        except TypeError as e:
            out[what] = str(e)
        out[what + "/whole"] = pickle.loads(pickle.dumps(obj.gather())).to_torch()
    return out


@pytest.mark.dist
def test_pickle_refused_for_a_rank_part():
    got = run_ranks(_pickle_in_a_group, 2, timeout=180)
    model, batches, _ = make("linear")
    order = batches[0::2] + batches[1::2]  # the group's example order: rank 0's, then rank 1's
    loader = loader_of(order)
    whole = {"PMatLowRank": FIM(model, loader, O.PMatLowRank).to_torch(),
             "FMatDense": GramMatrix(model, loader).to_torch(),
             "PushForwardDense": Jacobian(model, loader).to_torch()}
    for rank in range(2):
        for what, want in whole.items():
            assert got[rank][what].startswith(f"this {what} holds only this rank's part of an object "
                                              "sharded over a process group"), (rank, got[rank][what])
            assert rel(got[rank][what + "/whole"], want) <= RTOL, (rank, what)


# ------------------------------------------------------------------------------------------
# Monte-Carlo variants


class Segmenter(nn.Module):
    """Conv2d(2, 3, 3, padding=1) -> tanh -> Conv2d(3, 4, 1): logits (N, 4, 5, 5)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 1)).double()

    def forward(self, x):
        return self.net(x)


def _segmentation_loader(n):
    """(N, 2, 5, 5) inputs in batches of 4 (the last one shorter)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    return loader_of([(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.zeros(n - 4, dtype=torch.long))])


def _mc_case(variant):
    """(our model, nngeometry's model, loader) for ``variant``."""
    if variant == "segmentation_logits":
        # 10 examples: batches 4, 4, 2 (with a last batch of ONE example and trials=1,
        # nngeometry 0.4's segmentation matrix is off; see the replayed-draws test)
        return Segmenter(), Segmenter(), _segmentation_loader(10)
    ours, theirs, loader = fresh("conv2d")
    return nn.Sequential(ours, nn.LogSoftmax(dim=1)), nn.Sequential(theirs, nn.LogSoftmax(dim=1)), loader


@pm("variant", ["classif_logsoftmax", "segmentation_logits"])
@pm("trials", [1, 3])
def test_monte_carlo_variant_as_nngeometry(variant, trials):
    """The same draws for the same seed: the same matrix."""
    ours, theirs, loader = _mc_case(variant)
    torch.manual_seed(123)
    a = FIM_MonteCarlo(ours, loader, O.PMatDense, variant=variant, trials=trials).to_torch()
    torch.manual_seed(123)
    b = NGFIM_MonteCarlo(theirs, loader, NGDense, variant=variant, trials=trials).to_torch()
    assert a.shape == b.shape and rel(a, b) <= RTOL


def _replayed_segmentation_fim(model, loader, trials, seed):
    """The segmentation_logits definition computed independently: the draws replayed
    from ``seed`` in nngeometry's order (per batch, one multinomial over the (N H W, C)
    pixel-major probabilities), per-example gradients of
    r_t = sum_pixels log p(y_pixel,t) / sqrt(trials) by torch.func, 1/n sum_i sum_t r r^T."""
    from torch.func import functional_call, jacrev, vmap

    torch.manual_seed(seed)
    params = {k: p.detach() for k, p in model.named_parameters()}
    total, n = 0, 0
    for x, _ in loader:
        with torch.no_grad():
            logp = torch.log_softmax(model(x), dim=1)
        N, C, H, W = logp.shape
        drawn = torch.multinomial(logp.permute(0, 2, 3, 1).reshape(-1, C).exp(), trials, replacement=True)
        drawn = drawn.view(N, H * W, trials)

        def root(p, xi, yi):
            lp = torch.log_softmax(functional_call(model, p, (xi[None],)), dim=1)[0]
            return torch.gather(lp.permute(1, 2, 0).reshape(H * W, C), 1, yi).sum(0) * trials ** -0.5

        J = vmap(jacrev(root), in_dims=(None, 0, 0))(params, x, drawn)
        rows = torch.cat([J[k].reshape(N, trials, -1) for k in params], dim=2)
        total = total + torch.einsum("ntd,nte->de", rows, rows)
        n += N
    return total / n


@pm("trials", [1, 3])
def test_segmentation_logits_against_replayed_draws(trials):
    model, loader = Segmenter(), _segmentation_loader(9)  # batches 4, 4, 1
    torch.manual_seed(321)
    got = FIM_MonteCarlo(model, loader, O.PMatDense, variant="segmentation_logits", trials=trials).to_torch()
    assert rel(got, _replayed_segmentation_fim(model, loader, trials, 321)) <= RTOL


def test_classif_logsoftmax_is_classif_logits_of_the_logits():
    """A model ending in LogSoftmax under classif_logsoftmax draws what its logits draw
    under classif_logits (log_softmax is idempotent)."""
    model, _, loader = fresh("conv2d")
    torch.manual_seed(9)
    a = FIM_MonteCarlo(nn.Sequential(model, nn.LogSoftmax(dim=1)), loader, O.PMatDense,
                       variant="classif_logsoftmax", trials=2).to_torch()
    torch.manual_seed(9)
    b = FIM_MonteCarlo(model, loader, O.PMatDense, variant="classif_logits", trials=2).to_torch()
    assert rel(a, b) <= RTOL


def test_monte_carlo_variants_refuse_wrong_outputs():
    model, _, loader = fresh("conv2d")
    with pytest.raises(ValueError, match="variant classif_logsoftmax needs log-probabilities"):
        FIM_MonteCarlo(model, loader, O.PMatDiag, variant="classif_logsoftmax")
    with pytest.raises(ValueError, match=r"variant segmentation_logits needs logits of shape \(batch, C, H, W\)"):
        FIM_MonteCarlo(model, loader, O.PMatDiag, variant="segmentation_logits")


# ------------------------------------------------------------------------------------------
# nngeometry 0.4 call forms: impl= keywords, solvePVec, KFAC.to_torch(split_weight_bias)



def _ng_vector_pair(F, ng_F, seed=3):
    """The same random vector as ours and as nngeometry's PVector."""
    x = torch.randn(F.size(0), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (O.PVector(F.layer_collection, vector_repr=x.clone()),
            NGPVector(ng_F.generator.layer_collection, vector_repr=x.clone()))


@pm("impl", ["eigh", "svd"])
@pm("name", ["linear", "conv2d"])
def test_dense_eigendecomposition_impl_as_nngeometry(impl, name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatDense), NGFIM(theirs, loader, NGDense)
    evals, evecs = F.compute_eigendecomposition(impl=impl)
    assert bool((evals[1:] >= evals[:-1]).all())  # ours: ascending whatever impl
    ng_F.compute_eigendecomposition(impl=impl)
    ng_evals, ng_evecs = ng_F.get_eigendecomposition()
    assert rel(evals, torch.sort(ng_evals).values) <= RTOL
    assert rel(evecs @ torch.diag(evals) @ evecs.t(),
               ng_evecs @ torch.diag(ng_evals) @ ng_evecs.t()) <= RTOL
    with pytest.raises(ValueError, match="accepted: 'eigh', 'svd'"):
        F.compute_eigendecomposition(impl="qr")


def test_lowrank_eigendecomposition_impl_as_nngeometry():
    ours, theirs, loader = fresh()
    F, ng_F = FIM(ours, loader, O.PMatLowRank), NGFIM(theirs, loader, NGLowRank)
    evals, evecs = F.compute_eigendecomposition(impl="svd")
    ng_F.compute_eigendecomposition(impl="svd")
    ng_evals, ng_evecs = ng_F.get_eigendecomposition()
    keep = ng_evals > ng_evals.max() * 1e-10  # ours drops the zero eigenvalues
    assert rel(evals, torch.sort(ng_evals[keep]).values) <= RTOL
    assert rel(evecs @ torch.diag(evals) @ evecs.t(),
               ng_evecs @ torch.diag(ng_evals) @ ng_evecs.t()) <= RTOL
    with pytest.raises(ValueError, match="accepted: 'svd'"):
        F.compute_eigendecomposition(impl="eigh")


@pm("impl", ["default", "solve", "eigendecomposition"])
@pm("name", ["linear", "conv2d"])
def test_dense_solve_impl_as_nngeometry(impl, name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatDense), NGFIM(theirs, loader, NGDense)
    v, ng_v = _ng_vector_pair(F, ng_F)
    if impl == "eigendecomposition":
        ng_F.compute_eigendecomposition()
    want = ng_F.solve(ng_v, regul=1e-3, impl=impl).to_torch()
    assert rel(F.solve(v, regul=1e-3, impl=impl).to_torch(), want) <= RTOL
    assert rel(F.solvePVec(v, regul=1e-3, impl=impl).to_torch(), want) <= RTOL
    assert rel(F.solvePVec(v, 1e-3).to_torch(), ng_F.solvePVec(ng_v, 1e-3).to_torch()) <= RTOL
    with pytest.raises(ValueError, match="accepted: 'default', 'solve', 'eigendecomposition'"):
        F.solve(v, regul=1e-3, impl="cg")
    with pytest.raises(ValueError, match="accepted: 'default', 'solve', 'eigendecomposition'"):
        F.solvePVec(v, regul=1e-3, impl="cg")


def test_lowrank_and_kfac_solve_impl_accepted_and_refused():
    model, _, loader = fresh()
    L, K = FIM(model, loader, O.PMatLowRank), FIM(model, loader, O.PMatKFAC)
    v = O.random_pvector(L.layer_collection)
    for F, accepted in ((L, ("default", "svd")), (K, ("default",))):
        want = F.solve(v, regul=1e-3).to_torch()
        for impl in accepted:  # the same (our) solve whatever accepted impl
            assert torch.equal(F.solve(v, regul=1e-3, impl=impl).to_torch(), want)
            assert torch.equal(F.solvePVec(v, regul=1e-3, impl=impl).to_torch(), want)
        msg = "accepted: " + ", ".join(repr(a) for a in accepted)
        with pytest.raises(ValueError, match=msg):
            F.solve(v, regul=1e-3, impl="eigendecomposition")
        with pytest.raises(ValueError, match=msg):
            F.solvePVec(v, regul=1e-3, impl="eigendecomposition")
    # KFAC's use_pi passes through solvePVec
    assert torch.equal(K.solvePVec(v, regul=1e-3, use_pi=False).to_torch(),
                       K.solve(v, regul=1e-3, use_pi=False).to_torch())
    # representations whose solve has no impl: only "default"
    D = FIM(model, loader, O.PMatDiag)
    assert torch.equal(D.solvePVec(v, regul=1e-3).to_torch(), D.solve(v, regul=1e-3).to_torch())
    with pytest.raises(ValueError, match="accepted: 'default'"):
        D.solvePVec(v, regul=1e-3, impl="solve")


@pm("name", ["linear", "linear_nobias", "conv2d"])
def test_kfac_to_torch_split_weight_bias_as_nngeometry(name):
    ours, theirs, loader = fresh(name)
    F, ng_F = FIM(ours, loader, O.PMatKFAC), NGFIM(theirs, loader, NGKFAC)
    assert torch.equal(F.to_torch(split_weight_bias=True), F.to_torch())
    assert rel(F.to_torch(split_weight_bias=True), ng_F.to_torch(split_weight_bias=True)) <= RTOL
    assert rel(F.to_torch(split_weight_bias=False), ng_F.to_torch(split_weight_bias=False)) <= RTOL
    # the two layouts differ exactly when a layer has a bias
    has_bias = any(l.has_bias for l in F.layer_collection.layers.values())
    assert torch.equal(F.to_torch(split_weight_bias=False), F.to_torch()) is not has_bias


# ------------------------------------------------------------------------------------------
# more call forms: projections, layer shapes, flat FVectors, impl=, split_weight_bias, solve(J)


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
