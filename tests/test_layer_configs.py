"""Unusual but legal configurations of every supported layer type, against the independent
float64 oracle (tests/oracle.py), or refused with a clear message.

Each case is a tiny model around one layer in one configuration (non-square kernels,
strides, dilations and paddings, 'same' / 'valid', padding modes, ConvTranspose2d's
output_padding, no bias, multi-dimensional normalized shapes, no affine parameters,
Embedding's padding_idx and sparse gradients, Linear on sequences, frozen parameters). Computed on 5 examples
in two uneven batches: PMatDense, PMatDiag, PMatBlockDiag, PMatImplicit (mv, vTMv, trace),
GramMatrix and Jacobian at relative error <= 1e-10. A convolution's kernels pick between
equivalent routes by timing: every route is forced in turn. KFAC: the input factor of
convolutions (padding modes included) against patches unfolded by hand; layers it cannot
factor refuse by name.

Refusals: grouped convolutions, Embedding max_norm (refused by name, and left out exactly
with ignore_unsupported_layers=True), and any BatchNorm that normalises with batch
statistics (training mode, or track_running_stats=False) even without parameters or
outside the collection, since it mixes the examples of a batch.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oracle
from checks import block_mask, rel
from models import MeanOverDim, loader_of, randomise_norms

from nngeo_dist import FIM, GramMatrix, Jacobian, LayerCollection
from nngeo_dist.generator import layers as layer_kernels
from nngeo_dist.object import (
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PVector,
)

RTOL = 1e-10
DT = torch.float64
N_EXAMPLES, BATCH = 5, 3  # batches of 3 and 2


def _head(c: int = 3):
    return [nn.Tanh(), nn.Flatten(), nn.LazyLinear(c)]


# name -> (layers before the head, input shape per example, or ("tokens", vocab, *shape))
CASES = {
    # Linear
    "linear_seq3d": ([nn.Linear(4, 5), nn.Tanh(), MeanOverDim(1), nn.Linear(5, 3)], (3, 4)),
    "linear_4d_nobias": ([nn.Linear(4, 3, bias=False)] + _head(), (2, 3, 4)),
    # Conv1d
    "conv1d_same_even_dil": ([nn.Conv1d(2, 3, 4, padding="same", dilation=3)] + _head(), (2, 9)),
    "conv1d_stride_gt_kernel": ([nn.Conv1d(2, 3, 2, stride=3, padding=2)] + _head(), (2, 9)),
    "conv1d_tuples_nobias": ([nn.Conv1d(2, 3, (3,), stride=(2,), padding=(2,), dilation=(2,), bias=False)] + _head(), (2, 9)),
    "conv1d_circular": ([nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular")] + _head(), (2, 5)),
    # Conv2d
    "conv2d_nonsquare": ([nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2))] + _head(), (2, 5, 7)),
    "conv2d_same_dil": ([nn.Conv2d(2, 3, (2, 3), padding="same", dilation=(2, 1))] + _head(), (2, 5, 4)),
    "conv2d_same_even": ([nn.Conv2d(2, 3, (4, 2), padding="same")] + _head(), (2, 5, 4)),
    "conv2d_valid_nobias": ([nn.Conv2d(2, 3, (2, 3), padding="valid", bias=False)] + _head(), (2, 5, 4)),
    "conv2d_stride_gt_kernel": ([nn.Conv2d(2, 3, (2, 1), stride=(3, 2), padding=(1, 2))] + _head(), (2, 5, 4)),
    "conv2d_reflect": ([nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="reflect")] + _head(), (2, 4, 4)),
    "conv2d_replicate_same": ([nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="replicate")] + _head(), (2, 4, 4)),
    "conv2d_circular_stride": ([nn.Conv2d(2, 3, 2, stride=2, padding=1, dilation=(1, 2), padding_mode="circular", bias=False)] + _head(), (2, 4, 5)),
    # ConvTranspose2d
    "convT_outpad_dil": ([nn.ConvTranspose2d(2, 3, (2, 3), stride=(3, 2), padding=(1, 0), output_padding=(2, 1), dilation=(2, 1))] + _head(), (2, 3, 2)),
    "convT_stride_gt_kernel_nobias": ([nn.ConvTranspose2d(2, 3, 2, stride=3, bias=False)] + _head(), (2, 2, 3)),
    "convT_pad_dil": ([nn.ConvTranspose2d(2, 2, 3, padding=2, dilation=2)] + _head(), (2, 3, 3)),
    # BatchNorm (eval mode, running statistics)
    "bn1d_noaffine": ([nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False)] + _head(), (4,)),
    "bn1d_seq": ([nn.Conv1d(2, 3, 2), nn.BatchNorm1d(3, eps=0.1, momentum=None)] + _head(), (2, 4)),
    "bn2d_noaffine": ([nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3, affine=False, eps=0.1)] + _head(), (2, 4, 4)),
    # GroupNorm
    "gn_one_group": ([nn.Conv2d(2, 4, 2), nn.GroupNorm(1, 4)] + _head(), (2, 4, 4)),
    "gn_group_per_channel": ([nn.Conv2d(2, 4, 2), nn.GroupNorm(4, 4, eps=0.1)] + _head(), (2, 4, 4)),
    "gn_noaffine": ([nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4, affine=False)] + _head(), (2, 4, 4)),
    "gn_on_features": ([nn.Linear(3, 4), nn.GroupNorm(2, 4)] + _head(), (3,)),
    "gn_3d_spatial": ([nn.GroupNorm(2, 4)] + _head(), (4, 2, 2, 2)),
    # LayerNorm
    "ln_multidim": ([nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3))] + _head(), (4,)),
    "ln_multidim_nobias": ([nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.LayerNorm((2, 3), bias=False)] + _head(), (4,)),
    "ln_noaffine": ([nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False)] + _head(), (4,)),
    "ln_leading_dims": ([nn.Linear(4, 3), nn.LayerNorm(3)] + _head(), (2, 3, 4)),
    # RMSNorm
    "rms_multidim": ([nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.RMSNorm((2, 3))] + _head(), (4,)),
    "rms_eps_none": ([nn.Linear(4, 6), nn.RMSNorm(6, eps=None)] + _head(), (4,)),
    "rms_eps_large": ([nn.Linear(4, 6), nn.RMSNorm(6, eps=0.3)] + _head(), (4,)),
    "rms_noaffine": ([nn.Linear(4, 6), nn.RMSNorm(6, elementwise_affine=False)] + _head(), (4,)),
    "rms_seq": ([nn.Linear(4, 6), nn.RMSNorm(6), nn.Tanh(), MeanOverDim(1), nn.Linear(6, 3)], (3, 4)),
    # Embedding
    "emb_padding_idx": ([nn.Embedding(6, 3, padding_idx=2), MeanOverDim(1), nn.Linear(3, 3)], ("tokens", 6, 4)),
    "emb_padding_idx_negative": ([nn.Embedding(6, 3, padding_idx=-1), MeanOverDim(1), nn.Linear(3, 3)], ("tokens", 6, 4)),
    "emb_2d_tokens": ([nn.Embedding(6, 3)] + _head(), ("tokens", 6, 2, 3)),
    "emb_one_token": ([nn.Embedding(6, 3, padding_idx=0), nn.Linear(3, 3)], ("tokens", 6)),
    "emb_sparse": ([nn.Embedding(6, 3, sparse=True, padding_idx=1), MeanOverDim(1), nn.Linear(3, 3)], ("tokens", 6, 4)),
    # frozen parameters (requires_grad=False: FROZEN) are parameters all the same
    "frozen_first_linear": ([nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)], (4,)),
    "frozen_pretrained_embedding": ([nn.Embedding.from_pretrained(torch.randn(6, 3), padding_idx=2), MeanOverDim(1),
                                     nn.Linear(3, 3)], ("tokens", 6, 4)),
    "frozen_conv_bn_inplace_relu": ([nn.Conv2d(2, 3, 2, padding=(1, 0)), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
                                     nn.Flatten(), nn.LazyLinear(3)], (2, 3, 3)),
    "all_frozen": ([nn.Conv1d(2, 3, 2, padding="same", padding_mode="reflect"), nn.ReLU(inplace=True)] + _head(), (2, 5)),
}

#: case -> modules whose parameters are frozen (requires_grad=False; "" the whole model)
FROZEN = {"frozen_first_linear": ["0"], "frozen_pretrained_embedding": ["0"],
          "frozen_conv_bn_inplace_relu": ["0", "1"], "all_frozen": [""]}

CONV_KINDS = (nn.Conv1d, nn.Conv2d)
KFAC_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def build(name: str):
    """(model in eval mode, batches [(x, y)]) of case ``name``, deterministic."""
    mods, shape = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    torch.manual_seed(0)
    if shape[0] == "tokens":
        x = torch.randint(0, shape[1], (N_EXAMPLES, *shape[2:]), generator=g)
        x[0].view(-1)[0] = 2  # padding rows appear in the data
        x[1].view(-1)[-1] = shape[1] - 1
        x[2].view(-1)[0] = 0
    else:
        x = torch.randn((N_EXAMPLES, *shape), generator=g, dtype=DT)
    model = nn.Sequential(*copy.deepcopy(mods)).to(DT)
    model.eval()
    with torch.no_grad():
        model(x[:2])  # materialise LazyLinear
    randomise_norms(model, g)
    mods_by_name = dict(model.named_modules())
    for m in FROZEN.get(name, []):
        mods_by_name[m].requires_grad_(False)
    y = torch.zeros(N_EXAMPLES, dtype=torch.long)
    batches = [(x[s:s + BATCH], y[s:s + BATCH]) for s in range(0, N_EXAMPLES, BATCH)]
    return model, batches


def _oracle_model(model: nn.Module) -> nn.Module:
    """The oracle differentiates through vmap/jacrev, which has no sparse gradients: a
    copy with dense Embedding gradients (the same function)."""
    if not any(isinstance(m, nn.Embedding) and m.sparse for m in model.modules()):
        return model
    dense = copy.deepcopy(model)
    for m in dense.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = False
    return dense


@pytest.fixture(params=["first", "second"])
def route(request, monkeypatch):
    """Force every timed choice between equivalent kernels (layers.fastest) to its first
    or its second route, so that each route is checked whatever the timings say."""
    monkeypatch.setattr(layer_kernels, "_FASTEST", {})
    pick = 0 if request.param == "first" else -1
    monkeypatch.setattr(layer_kernels, "_time_routes", lambda key, routes, device: list(routes)[pick])
    return request.param


def _cases_with_routes():
    """Convolution cases with both routes forced; other cases once."""
    out = []
    for name, (mods, _) in CASES.items():
        conv = any(isinstance(m, CONV_KINDS) for m in mods)
        for r in (["first", "second"] if conv else ["first"]):
            out.append(pytest.param(name, r, id=f"{name}-{r}"))
    return out


@pytest.mark.parametrize("name, route", _cases_with_routes(), indirect=["route"])
def test_against_oracle(name, route):
    model, batches = build(name)
    loader = loader_of(batches)
    om = _oracle_model(model)
    J, f = oracle.jacobian_and_outputs(om, None, batches)
    Fo = oracle.fim_dense(om, batches, "classif_logits")
    lc = LayerCollection.from_model(model)
    assert lc.numel() == Fo.shape[0] == sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    v = torch.randn(lc.numel(), generator=g, dtype=DT)
    pv = PVector(lc, vector_repr=v)

    errs = {}
    errs["dense"] = rel(FIM(model, loader, PMatDense).to_torch(), Fo)
    errs["diag"] = rel(FIM(model, loader, PMatDiag).get_diag(), torch.diag(Fo))
    errs["blockdiag"] = rel(FIM(model, loader, PMatBlockDiag).to_torch(), Fo * block_mask(lc))
    Fi = FIM(model, loader, PMatImplicit)
    errs["implicit_mv"] = rel(Fi.mv(pv).get_flat_representation(), Fo @ v)
    errs["implicit_vTMv"] = rel(Fi.vTMv(pv), v @ Fo @ v)
    errs["implicit_trace"] = rel(Fi.trace(), Fo.trace())
    errs["gram"] = rel(GramMatrix(model, loader).to_torch(), torch.einsum("aik,bjk->aibj", J, J))
    errs["jacobian"] = rel(Jacobian(model, loader).to_torch(), J)
    bad = {k: e for k, e in errs.items() if not e <= RTOL}
    assert not bad, f"{name} (route {route}): relative errors {bad}"


# ------------------------------------------------------------------------------------------
# KFAC: input factors of convolutions by hand; refusals for what it cannot factor


def _patches_by_hand(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N * T, i') the convolution's input patches with a trailing 1 for a bias, unfolded
    from the input padded as torch's forward pads it (F.pad with the padding mode)."""
    two_d = isinstance(mod, nn.Conv2d)
    pads = mod._reversed_padding_repeated_twice
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    xp = F.pad(x, pads, mode=mode)
    if not two_d:
        xp = xp.unsqueeze(2)
    ks = mod.kernel_size if two_d else (1, mod.kernel_size[0])
    st = mod.stride if two_d else (1, mod.stride[0])
    dl = mod.dilation if two_d else (1, mod.dilation[0])
    cols = F.unfold(xp, ks, dilation=dl, stride=st)  # (N, i, T)
    p = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mod.bias is not None:
        p = torch.cat([p, torch.ones_like(p[:, :1])], dim=1)
    return p


KFAC_CONV_CASES = [n for n, (mods, _) in CASES.items() if any(isinstance(m, CONV_KINDS) for m in mods)]


@pytest.mark.parametrize("name", KFAC_CONV_CASES)
def test_kfac_conv_input_factor(name, route):
    model, batches = build(name)
    conv = next(m for m in model.modules() if isinstance(m, CONV_KINDS))
    cname = next(n for n, m in model.named_modules() if m is conv)
    seen = []
    h = conv.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    for x, _ in batches:
        model(x)
    h.remove()
    P = torch.cat([_patches_by_hand(conv, x) for x in seen])
    A_hand = P.t() @ P / N_EXAMPLES
    lc = LayerCollection()
    lc.add_layer_from_model(model, conv, name=cname)
    Fk = FIM(model, loader_of(batches), PMatKFAC, layer_collection=lc)
    A, G = Fk.data[cname]
    assert rel(A, A_hand) <= RTOL, f"{name} (route {route})"


NO_KFAC = [n for n, (mods, _) in CASES.items()
           if any(isinstance(m, (nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm,
                                 nn.LayerNorm, nn.RMSNorm)) and any(True for _ in m.parameters())
                  for m in mods)]


@pytest.mark.parametrize("name", NO_KFAC)
def test_kfac_refuses_layers_it_cannot_factor(name):
    model, batches = build(name)
    with pytest.raises(TypeError, match=r"KFAC cannot factor layer '\d+' \((ConvTranspose2d|BatchNorm\dd|GroupNorm|LayerNorm|RMSNorm)\)"):
        FIM(model, loader_of(batches), PMatKFAC)


# ------------------------------------------------------------------------------------------
# configurations the kernels do not cover: refused by name; left out exactly on request


def _grouped_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).to(DT).eval()
    x = torch.randn(N_EXAMPLES, 2, 4, 4, dtype=DT)
    return model, x, "groups=2"


def _grouped_conv_transpose():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).to(DT).eval()
    x = torch.randn(N_EXAMPLES, 2, 2, 2, dtype=DT)
    return model, x, "groups=2"


def _max_norm_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3, max_norm=0.5), MeanOverDim(1), nn.Linear(3, 3)).to(DT).eval()
    x = torch.randint(0, 6, (N_EXAMPLES, 4))
    return model, x, "max_norm"


UNSUPPORTED = {"conv2d_groups": _grouped_conv, "convT_groups": _grouped_conv_transpose,
               "emb_max_norm": _max_norm_embedding}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_configuration_refused_then_ignored(name):
    model, x, what = UNSUPPORTED[name]()
    loader = loader_of([(x,)], batch_size=BATCH)
    with pytest.raises(TypeError, match=rf"module '0' .*{what}.*ignore_unsupported_layers=True"):
        FIM(model, loader, PMatDense)
    # the remedy the message names works: the layer is left out, the rest is exact
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert list(lc.layers) == (["2"] if name == "emb_max_norm" else ["3"])
    with torch.no_grad():
        model(x)  # max_norm renormalises the rows it reads, once and for all
    om = copy.deepcopy(model)
    if name == "emb_max_norm":
        om[0].max_norm = None  # same function now; the oracle's vmap cannot renormalise
    params = lc.parameters(om)
    Fo = oracle.fim_dense(om, [(x[:BATCH],), (x[BATCH:],)], "classif_logits", params=params)
    Fd = FIM(model, loader, PMatDense, layer_collection=lc).to_torch()
    assert rel(Fd, Fo) <= RTOL
    J = oracle.per_example_jacobian(om, None, [(x,)], params=params)
    assert rel(GramMatrix(model, loader, layer_collection=lc).to_torch(), torch.einsum("aik,bjk->aibj", J, J)) <= RTOL


# ------------------------------------------------------------------------------------------
# BatchNorm that normalises with batch statistics: refused wherever it sits


def _bn_model(bn: nn.Module, mode: str):
    model = nn.Sequential(nn.Linear(4, 6), bn, nn.Tanh(), nn.Linear(6, 3)).to(DT)
    getattr(model, mode)()
    return model


BATCH_STATS = {
    # (BatchNorm, mode, message, layer collection: None = from_model)
    "noaffine_training": (lambda: nn.BatchNorm1d(6, affine=False), "train", "training mode", None),
    "noaffine_untracked_eval": (lambda: nn.BatchNorm1d(6, affine=False, track_running_stats=False), "eval",
                                "track_running_stats=False", None),
    "affine_training_outside_collection": (lambda: nn.BatchNorm1d(6), "train", "training mode", ["0", "3"]),
    "untracked_eval_outside_collection": (lambda: nn.BatchNorm1d(6, track_running_stats=False), "eval",
                                          "track_running_stats=False", ["0", "3"]),
    "unregistered_batchnorm3d_training": (lambda: nn.Sequential(nn.Unflatten(1, (6, 1, 1, 1)), nn.BatchNorm3d(6, affine=False),
                                                                nn.Flatten()), "train", "training mode", None),
}

ENTRY_POINTS = {
    "dense": lambda m, l, lc: FIM(m, l, PMatDense, layer_collection=lc),
    "implicit_trace": lambda m, l, lc: FIM(m, l, PMatImplicit, layer_collection=lc).trace(),
    "gram": lambda m, l, lc: GramMatrix(m, l, layer_collection=lc),
    "jacobian": lambda m, l, lc: Jacobian(m, l, layer_collection=lc).to_torch(),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BATCH_STATS))
def test_batch_statistics_refused(case, entry):
    make_bn, mode, message, names = BATCH_STATS[case]
    model = _bn_model(make_bn(), mode)
    if names is None:
        lc = LayerCollection.from_model(model)
    else:  # the BatchNorm left out of the collection
        lc = LayerCollection()
        for n in names:
            lc.add_layer_from_model(model, dict(model.named_modules())[n], name=n)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(N_EXAMPLES, 4, dtype=DT)
    with pytest.raises(RuntimeError, match=rf"module '1(\.1)?' \(BatchNorm[13]d\) .*{message}.*per-example gradients are undefined"):
        ENTRY_POINTS[entry](model, loader_of([(x,)], batch_size=BATCH), lc)
    after = model.state_dict()  # refused before any forward: running statistics untouched
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_untracked_batchnorm_with_parameters_not_ignorable():
    """ignore_unsupported_layers leaves out layers the kernels do not cover, not a layer
    that makes every other layer's per-example gradients undefined."""
    model = _bn_model(nn.BatchNorm1d(6, track_running_stats=False), "eval")
    with pytest.raises(TypeError, match=r"module '1' \(BatchNorm1d\) has track_running_stats=False"):
        LayerCollection.from_model(model, ignore_unsupported_layers=True)
