"""Bad input (issue 2): each gets an exception whose message names the problem and the fix;
nothing is silently wrong. Where a representation *can* handle the input (PMatImplicit on a
module called twice), it must give the oracle's numbers (1e-10).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import oracle
from models import loader_of, make

from nngeo_dist import FIM, FIM_MonteCarlo, GramMatrix, Jacobian, LayerCollection
from nngeo_dist.object import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PushForwardImplicit,
    PVector,
)
from checks import rel

RTOL = 1e-10
pm = pytest.mark.parametrize


REPS = [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank, PMatImplicit]
REP_IDS = [r.__name__ for r in REPS]
PER_LAYER = [PMatDense, PMatDiag, PMatBlockDiag, PMatLowRank]
PER_LAYER_IDS = [r.__name__ for r in PER_LAYER]
D64 = torch.float64




def message(excinfo) -> str:
    return str(excinfo.value)


def use(M):
    """Force a matrix to do its work: PMatImplicit computes lazily, at each operation."""
    if isinstance(M, PMatImplicit):
        d = M.layer_collection.numel()
        return M.vTMv(PVector(M.layer_collection, vector_repr=torch.ones(d, dtype=D64)))
    return M


def toy_loader(n=7, d_in=4, batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=D64)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def brute_fim_classif(model, loader, params):
    """classif_logits FIM by one autograd.grad per example and output (no torch.func: its
    vmap(jacrev) gives wrong per-example Jacobians through nn.PReLU in torch 2.13)."""
    F, n = 0.0, 0
    for x, _ in loader:
        for i in range(x.shape[0]):
            out = model(x[i : i + 1])[0]
            J = torch.stack([
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[k], params, retain_graph=True)])
                for k in range(out.shape[0])
            ])
            p = torch.softmax(out.detach(), 0)
            F = F + J.t() @ (torch.diag(p) - torch.outer(p, p)) @ J
            n += 1
    return F / n


# ------------------------------------------------------------------------------------------
# unsupported parametrised module
def prelu_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)).double().eval()


class AttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.proj(x).unsqueeze(1)
        h, _ = self.attn(h, h, h)
        return self.head(h[:, 0])


@pm("factory,modname,kind", [
    (prelu_model, "'1'", "PReLU"),
    (lambda: (torch.manual_seed(0), AttentionModel().double().eval())[1], "'attn'", "MultiheadAttention"),
], ids=["PReLU", "MultiheadAttention"])
def test_unsupported_module(factory, modname, kind):
    model = factory()
    L = toy_loader()
    for call in (lambda: LayerCollection.from_model(model), lambda: FIM(model, L, PMatDense)):
        with pytest.raises(TypeError) as e:
            call()
        msg = message(e)
        assert modname in msg and kind in msg, msg
        assert "ignore_unsupported_layers=True" in msg, msg
    # the fix the message names works, and leaves exactly that module's parameters out
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert kind not in {l.kind for l in lc.layers.values()}
    params = lc.parameters(model)
    F = FIM(model, L, PMatDense, layer_collection=lc)
    ref = brute_fim_classif(model, L, params)
    assert rel(F.to_torch(), ref) <= RTOL
    I = FIM(model, L, PMatImplicit, layer_collection=lc)
    v = torch.linspace(-1, 1, lc.numel(), dtype=D64)
    assert rel(I.vTMv(PVector(lc, vector_repr=v)), v @ ref @ v) <= RTOL


# ------------------------------------------------------------------------------------------
# tied weights (one Parameter in two modules)
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.l2.weight = self.l1.weight
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def test_tied_weights_refused_with_fix():
    model = Tied().double().eval()
    for call in (lambda: LayerCollection.from_model(model), lambda: FIM(model, toy_loader(), PMatDense)):
        with pytest.raises(ValueError) as e:
            call()
        msg = message(e)
        assert "'l1'" in msg and "'l2'" in msg and "tied weights" in msg, msg
        assert "PMatImplicit" in msg, msg


def tied_one_owner():
    """The collection the error message suggests: holds only one of the tied modules."""
    model = Tied().double().eval()
    lc = LayerCollection()
    lc.add_layer_from_model(model, model.l1)
    lc.add_layer_from_model(model, model.out)
    L = toy_loader()
    ref = oracle.fim_dense(model, list(L), "classif_logits", params=lc.parameters(model))
    return model, lc, L, ref


def test_tied_weights_implicit_with_one_owner_matches_oracle():
    """d f / d W for the shared W sums both uses: the implicit operator sees both."""
    model, lc, L, ref = tied_one_owner()
    I = FIM(model, L, PMatImplicit, layer_collection=lc)
    v = torch.linspace(-1, 1, lc.numel(), dtype=D64)
    assert rel(I.vTMv(PVector(lc, vector_repr=v)), v @ ref @ v) <= RTOL
    assert rel(I.mv(PVector(lc, vector_repr=v)).to_torch(), ref @ v) <= RTOL


@pm("rep", PER_LAYER, ids=PER_LAYER_IDS)
def test_tied_weights_per_layer_with_one_owner_not_silently_wrong(rep):
    """Either a clear error or the oracle's numbers (restricted to what ``rep`` keeps)."""
    model, lc, L, ref = tied_one_owner()
    try:
        F = FIM(model, L, rep, layer_collection=lc)
    except (ValueError, RuntimeError) as e:
        assert any(w in str(e) for w in ("tied", "shared", "twice")), str(e)
        return
    if rep is PMatDiag:
        assert rel(F.get_diag(), torch.diagonal(ref)) <= RTOL
    elif rep is PMatBlockDiag:
        s = lc.layers["l1"].numel()
        assert rel(F.to_torch()[:s, :s], ref[:s, :s]) <= RTOL
    else:
        assert rel(F.to_torch(), ref) <= RTOL


# ------------------------------------------------------------------------------------------
# a module called twice in one forward
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.l(torch.tanh(self.l(x)))))


_TWICE: dict = {}


def twice_case():
    if not _TWICE:
        model = Twice().double().eval()
        L = toy_loader()
        J, f = oracle.jacobian_and_outputs(model, None, list(L))
        ref = oracle.fim_dense(model, list(L), "classif_logits")
        _TWICE.update(model=model, L=L, J=J, ref=ref)
    return _TWICE["model"], _TWICE["L"], _TWICE["J"], _TWICE["ref"]


@pm("build", [
    *[(lambda r: (lambda m, L: FIM(m, L, r)))(r) for r in PER_LAYER],
    lambda m, L: GramMatrix(m, L),
    lambda m, L: Jacobian(m, L),
], ids=PER_LAYER_IDS + ["GramMatrix", "Jacobian"])
def test_module_called_twice_per_layer_refused(build):
    model, L, _, _ = twice_case()
    with pytest.raises(RuntimeError) as e:
        build(model, L)
    msg = message(e)
    assert "'l'" in msg and "twice" in msg and "PMatImplicit" in msg, msg


def test_module_called_twice_implicit_matches_oracle():
    model, L, J, ref = twice_case()
    I = FIM(model, L, PMatImplicit)
    lc = I.layer_collection
    v = torch.linspace(-1, 1, lc.numel(), dtype=D64)
    pv = PVector(lc, vector_repr=v)
    assert rel(I.vTMv(pv), v @ ref @ v) <= RTOL
    assert rel(I.mv(pv).to_torch(), ref @ v) <= RTOL
    regul = ref.trace().item() / lc.numel()
    x = I.solve(pv, regul=regul).to_torch()
    assert rel((ref + regul * torch.eye(lc.numel(), dtype=D64)) @ x, v) <= 1e-8
    P = Jacobian(model, L, representation=PushForwardImplicit)
    assert rel(P.mv(pv).to_torch(), J @ v) <= RTOL


@pm("op", ["trace", "get_diag"])
def test_module_called_twice_implicit_trace_and_diag(op):
    model, L, J, ref = twice_case()
    I = FIM(model, L, PMatImplicit)
    want = ref.trace() if op == "trace" else torch.diagonal(ref)
    assert rel(getattr(I, op)(), want) <= RTOL


# ------------------------------------------------------------------------------------------
# BatchNorm in training mode
def bn_train():
    model, batches, _ = make("batchnorm2d")
    model.train()
    return model, loader_of(batches)


@pm("build", [
    *[(lambda r: (lambda m, L: FIM(m, L, r)))(r) for r in PER_LAYER],
    lambda m, L: GramMatrix(m, L),
    lambda m, L: Jacobian(m, L),
], ids=PER_LAYER_IDS + ["GramMatrix", "Jacobian"])
def test_batchnorm_training_mode(build):
    model, L = bn_train()
    with pytest.raises(RuntimeError) as e:
        build(model, L)
    msg = message(e)
    assert "'1'" in msg and "BatchNorm2d" in msg and "training mode" in msg, msg
    assert "model.eval()" in msg, msg


@pm("op", ["vTMv", "mv"])
def test_batchnorm_training_mode_implicit(op):
    model, L = bn_train()
    with pytest.raises(RuntimeError) as e:
        M = FIM(model, L, PMatImplicit)
        v = PVector(M.layer_collection, vector_repr=torch.ones(M.layer_collection.numel(), dtype=D64))
        getattr(M, op)(v)
    assert "model.eval()" in message(e)


def test_batchnorm_training_mode_refusal_leaves_model_unchanged():
    """A refused call does not update the BatchNorm running statistics behind the user's
    back."""
    model, L = bn_train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        FIM(model, L, PMatDiag)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), f"{k} changed"


# ------------------------------------------------------------------------------------------
# empty loaders
class NoLen:
    """An iterable without __len__ that yields nothing."""

    def __iter__(self):
        return iter(())


EMPTY = {
    "DataLoader": lambda: DataLoader(TensorDataset(torch.zeros(0, 5, dtype=D64), torch.zeros(0, dtype=torch.long)), batch_size=4),
    "list": lambda: [],
    "iterable": NoLen,
}
BUILDERS = {
    **{r.__name__: (lambda r: (lambda m, L: use(FIM(m, L, r))))(r) for r in REPS},
    "FIM_MonteCarlo": lambda m, L: FIM_MonteCarlo(m, L, PMatDense, seed=0),
    "GramMatrix": lambda m, L: GramMatrix(m, L),
    "Jacobian": lambda m, L: Jacobian(m, L),
    "PushForwardImplicit": lambda m, L: Jacobian(m, L, representation=PushForwardImplicit).mv(
        PVector.from_model(m)
    ),
}


def _empty_params():
    out = []
    for e in EMPTY:
        for b in BUILDERS:
            marks = ()
            if e == "iterable" and b == "Jacobian":
                pass
            out.append(pytest.param(e, b, marks=marks, id=f"{b}-{e}"))
    return out


@pm("empty,builder", _empty_params())
def test_empty_loader(empty, builder):
    model, _, _ = make("linear")
    with pytest.raises(ValueError) as e:
        BUILDERS[builder](model, EMPTY[empty]())
    msg = message(e)
    assert "empty" in msg or "no example was seen" in msg, msg


# ------------------------------------------------------------------------------------------
# NaN / Inf in the outputs
def nan_model():
    model, batches, _ = make("conv2d")
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    return model, loader_of(batches)


def nan_input():
    model, batches, _ = make("conv2d")
    x, y = batches[0]
    x = x.clone()
    x[1, 0, 0, 0] = float("nan")
    return model, loader_of([(x, y)] + batches[1:])


def inf_output():
    model, batches, _ = make("conv2d")
    with torch.no_grad():
        model[3].bias[0] = float("inf")
    return model, loader_of(batches)


SOURCES = {"nan_weight": nan_model, "nan_input": nan_input, "inf_output": inf_output}


NONFINITE_BUILDERS = {
    **{r.__name__: (lambda r: (lambda m, L: FIM(m, L, r)))(r) for r in PER_LAYER},
    "GramMatrix": lambda m, L: GramMatrix(m, L),
    "Jacobian": lambda m, L: Jacobian(m, L),
    "PMatImplicit.trace": lambda m, L: FIM(m, L, PMatImplicit).trace(),
    "PMatImplicit.vTMv": lambda m, L: use(FIM(m, L, PMatImplicit)),
    "PMatImplicit.mv": lambda m, L: FIM(m, L, PMatImplicit).mv(PVector.from_model(m)),
    "PushForwardImplicit.mv": lambda m, L: Jacobian(m, L, representation=PushForwardImplicit).mv(
        PVector.from_model(m)
    ),
}
_FORWARD_MODE = ("PMatImplicit.vTMv", "PMatImplicit.mv", "PushForwardImplicit.mv")


def _nonfinite_params():
    out = []
    for src in SOURCES:
        for b in NONFINITE_BUILDERS:
            marks = ()
            if b in _FORWARD_MODE:
                pass
            out.append(pytest.param(src, b, marks=marks, id=f"{b}-{src}"))
    return out


@pm("source,builder", _nonfinite_params())
def test_nonfinite_outputs(source, builder):
    model, L = SOURCES[source]()
    with pytest.raises(FloatingPointError) as e:
        NONFINITE_BUILDERS[builder](model, L)
    msg = message(e)
    assert "NaN or Inf" in msg and "check the inputs and the weights" in msg, msg
    if source == "nan_input" and builder not in _FORWARD_MODE:
        assert "[1]" in msg, msg  # names the offending example of the batch


@pm("rep", [PMatDense, PMatDiag], ids=["PMatDense", "PMatDiag"])
def test_nonfinite_gradients_with_finite_outputs(rep):
    model, batches, _ = make("conv2d")
    x, y = batches[0]
    x = x.clone()
    x[1, 0, 0, 0] = float("inf")
    assert torch.isfinite(model(x)).all()  # tanh(inf) = 1: the outputs are finite
    with pytest.raises(FloatingPointError):
        FIM(model, loader_of([(x, y)]), rep)


# ------------------------------------------------------------------------------------------
# a PVector from another LayerCollection
_MATS: dict = {}


def linear_mat(rep):
    if rep not in _MATS:
        model, batches, _ = make("linear")
        _MATS[rep] = FIM(model, loader_of(batches), rep)
    return _MATS[rep]


def foreign_vectors():
    other, _, _ = make("conv1d")  # another architecture
    model, _, _ = make("linear")
    sub = LayerCollection.from_model(model).sub_collection(["2"])  # a subspace
    return {"other_model": PVector.from_model(other), "sub_collection": PVector.from_model(model, sub)}


@pm("rep", REPS, ids=REP_IDS)
@pm("op", ["mv", "vTMv", "solve"])
@pm("which", ["other_model", "sub_collection"])
def test_pvector_from_another_layer_collection(rep, op, which):
    M = linear_mat(rep)
    v = foreign_vectors()[which]
    with pytest.raises(ValueError) as e:
        getattr(M, op)(v)
    msg = message(e)
    assert "another LayerCollection" in msg and "PVector.from_model(model, F.layer_collection)" in msg, msg


def test_pvector_of_same_architecture_accepted():
    """Equal collections (same layers and shapes, another model instance) are one space."""
    M = linear_mat(PMatDense)
    twin, _, _ = make("linear", seed=5)
    v = PVector.from_model(twin)
    assert rel(M.mv(v).to_torch(), M.to_torch() @ v.to_torch()) <= RTOL


@pm("kind", ["dense", "implicit"])
@pm("which", ["other_model", "sub_collection"])
def test_pushforward_pvector_from_another_layer_collection(kind, which):
    model, batches, _ = make("linear")
    L = loader_of(batches)
    rep = {} if kind == "dense" else {"representation": PushForwardImplicit}
    P = Jacobian(model, L, **rep)
    with pytest.raises(ValueError, match="another LayerCollection"):
        P.mv(foreign_vectors()[which])


# ------------------------------------------------------------------------------------------
# n_output that disagrees with the model
@pm("builder", [
    *[pytest.param((lambda r: (lambda m, L: use(FIM(m, L, r, n_output=5))))(r), id=r.__name__) for r in REPS],
    pytest.param(lambda m, L: FIM(m, L, PMatDense, n_output=5, variant="regression"), id="regression"),
    pytest.param(lambda m, L: FIM_MonteCarlo(m, L, PMatDense, n_output=5, seed=0), id="FIM_MonteCarlo"),
    pytest.param(lambda m, L: GramMatrix(m, L, n_output=5), id="GramMatrix"),
    pytest.param(lambda m, L: Jacobian(m, L, n_output=5), id="Jacobian"),
])
def test_n_output_disagrees(builder):
    model, batches, c = make("linear")
    assert c == 3
    with pytest.raises(ValueError) as e:
        builder(model, loader_of(batches))
    msg = message(e)
    assert "n_output=5" in msg and "3 outputs" in msg and "drop n_output" in msg, msg


# ------------------------------------------------------------------------------------------
# unknown variant, wrong variant for the model
def test_unknown_variant_lists_valid_names():
    model, batches, _ = make("linear")
    with pytest.raises(ValueError) as e:
        FIM(model, loader_of(batches), PMatDense, variant="classif_logsoftmax")
    msg = message(e)
    assert "classif_logsoftmax" in msg
    for v in ("classif_logits", "classif_binary_logits", "regression"):
        assert v in msg, msg


def test_unknown_montecarlo_variant_lists_valid_names():
    model, batches, _ = make("linear")
    with pytest.raises(ValueError) as e:
        FIM_MonteCarlo(model, loader_of(batches), PMatDense, variant="classif_binary_logits")
    msg = message(e)
    assert "classif_binary_logits" in msg and "classif_logits" in msg and "regression" in msg, msg


def test_binary_variant_on_several_logits():
    model, batches, _ = make("linear")
    with pytest.raises(ValueError) as e:
        FIM(model, loader_of(batches), PMatDense, variant="classif_binary_logits")
    msg = message(e)
    assert "one logit" in msg and "classif_logits" in msg, msg


@pytest.mark.parametrize("rep", [PMatDense, PMatKFAC])
def test_classif_logits_on_one_dimensional_outputs(rep):
    """A function returning (batch,) has no class axis: named, with the variant to use."""
    model, batches, _ = make("linear")
    with pytest.raises(ValueError, match=r"classif_logits needs logits of shape \(batch, c\).*"
                                         r"shape \(\d+,\).*classif_binary_logits"):
        FIM(model, loader_of(batches), rep, function=lambda x, y: model(x)[:, 0])


def test_nngeometry_positional_arguments_named():
    """nngeometry 0.4's 4th positional argument (FIM's variant, Gram's representation)
    lands in n_output here: refused naming it, not misread."""
    model, batches, _ = make("linear")
    loader = loader_of(batches)
    for call in (lambda: FIM(model, loader, PMatDense, "regression"),
                 lambda: GramMatrix(model, loader, None, PMatDense)):
        with pytest.raises(TypeError, match=r"n_output=.* is not a number of outputs.*by keyword"):
            call()
    import numpy as np

    c = FIM(model, loader, PMatDense).to_torch()  # a numpy integer is a number of outputs
    assert torch.equal(FIM(model, loader, PMatDense, np.int64(3)).to_torch(), c)


def test_device_argument_of_nngeometry():
    """device= (nngeometry 0.4) is the model's device: accepted and equal, or refused."""
    model, batches, _ = make("linear")
    loader = loader_of(batches)
    assert torch.equal(FIM(model, loader, PMatDiag, device="cpu").get_diag(),
                       FIM(model, loader, PMatDiag).get_diag())
    with pytest.raises(ValueError, match=r"device=cuda but the model is on cpu.*model.to\(device\)"):
        FIM(model, loader, PMatDiag, device="cuda")


def test_montecarlo_zero_trials():
    model, batches, _ = make("linear")
    with pytest.raises(ValueError, match="trials=0"):
        FIM_MonteCarlo(model, loader_of(batches), PMatDense, trials=0)


# ------------------------------------------------------------------------------------------
# solve / inverse with regul <= 0 on a singular matrix
def singular(rep):
    """A singular FIM: more parameters (57) than rank (c n = 3 x 2 examples)."""
    model, batches, _ = make("linear", n=2, batch_size=2)
    M = FIM(model, loader_of(batches), rep)
    if rep is PMatDiag:  # make the diagonal singular too: a zero FIM on one coordinate
        M = FIM(model, loader_of(batches), rep, variant="regression")
        M.data[0] = 0.0
    return M


@pm("rep", REPS, ids=REP_IDS)
@pm("regul", [0.0, -1e-3])
def test_solve_nonpositive_regul_on_singular(rep, regul):
    M = singular(rep)
    v = PVector(M.layer_collection, vector_repr=torch.ones(M.layer_collection.numel(), dtype=D64))
    with pytest.raises(ValueError) as e:
        M.solve(v, regul=regul)
    msg = message(e)
    assert "regul" in msg and "positive" in msg, msg


@pm("rep", [PMatDense, PMatDiag, PMatBlockDiag], ids=["PMatDense", "PMatDiag", "PMatBlockDiag"])
def test_inverse_zero_regul_on_singular(rep):
    M = singular(rep)
    with pytest.raises(ValueError) as e:
        M.inverse(regul=0.0)
    assert "regul" in message(e) and "positive" in message(e)


# ------------------------------------------------------------------------------------------
# a function of the wrong shape, a collection layer the function never calls
def test_function_output_not_2d():
    model, batches, _ = make("linear")
    with pytest.raises(ValueError) as e:
        FIM(model, loader_of(batches), PMatDense, variant="regression",
            function=lambda x, y: model(x).unsqueeze(2))
    assert "(batch, n_output)" in message(e)


def test_layer_not_called_by_function():
    model, batches, _ = make("linear")
    with pytest.raises(RuntimeError) as e:
        FIM(model, loader_of(batches), PMatDense, variant="regression",
            function=lambda x, y: model[0](x))  # never reaches layer '2'
    assert "'2'" in message(e) and "not called" in message(e)
