"""A batch of 0 examples contributes nothing: every quantity computed over a loader that
yields one (at the start, in the middle, at the end) equals the same quantity over the
loader without it, in float64. A loader of only such batches is an empty loader: the one
clear "no example was seen" error, whatever the quantity (in a group too, on every rank).

Oracle: the same computation on the same batches, the empty one removed (same summation
order, so equal up to the route autograd picks for the backward: 1e-12).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from models import make

from nngeo_dist import FIM, FIM_MonteCarlo, GramMatrix, Jacobian
from nngeo_dist.generator import batch_examples, is_empty_batch, no_example_error
from nngeo_dist.object import (
    FVector,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    PullBackDense,
    PushForwardImplicit,
    PVector,
)

try:
    from dist_harness import run_ranks
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import run_ranks

TOL = dict(rtol=1e-12, atol=1e-12)
N, BATCH = 9, 3  # three batches of three examples
POSITIONS = {"start": 0, "middle": 2, "end": 3}  # where the empty batch goes among the three
NO_EXAMPLE = str(no_example_error())


# ------------------------------------------------------------------------------ data


def _problem(name: str = "linear"):
    """(float64 model, its batches, c)."""
    return make(name, n=N, batch_size=BATCH, seed=0)


def _empty_like(batch) -> tuple:
    return tuple(t[:0] for t in batch)


def _with_empty(batches: list, position: str) -> list:
    """``batches`` with a batch of 0 examples inserted at ``position``."""
    at = POSITIONS[position]
    return batches[:at] + [_empty_like(batches[0])] + batches[at:]


class _Collate:
    """default_collate, which cannot stack 0 examples: a collate that may be handed none
    (a filtering sampler's) returns ``empty`` then."""

    def __init__(self, empty: tuple):
        self.empty = empty

    def __call__(self, items: list):
        return default_collate(items) if items else self.empty


def _examples(batches: list) -> tuple:
    """(x, y): the examples of ``batches``, concatenated."""
    return tuple(torch.cat(ts) for ts in zip(*batches))


def _index_loader(batches: list, index_lists: list) -> DataLoader:
    """A DataLoader whose batch sampler yields ``index_lists`` (an empty one included)
    over the examples of ``batches``."""
    x, y = _examples(batches)
    return DataLoader(TensorDataset(x, y), batch_sampler=index_lists, collate_fn=_Collate((x[:0], y[:0])))


def _assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


# ------------------------------------------------------------------------------ quantities


def _implicit_ops(F) -> tuple:
    lc = F.layer_collection
    g = torch.Generator().manual_seed(3)
    v = PVector(lc, vector_repr=torch.randn(lc.numel(), generator=g, dtype=torch.float64))
    return F.trace(), F.get_diag(), F.mv(v).to_torch(), F.vTMv(v)


def _fim(rep, **kw):
    def compute(model, loader, c):
        F = FIM(model, loader, rep, variant="classif_logits", **kw)
        return _implicit_ops(F) if rep is PMatImplicit else (F.to_torch(),)

    return compute


def _monte_carlo(model, loader, c):
    return (FIM_MonteCarlo(model, loader, PMatDense, trials=2, seed=7).to_torch(),)


def _n_output_checked(model, loader, c):
    """``n_output=`` is checked on the first batch with examples."""
    return (FIM(model, loader, PMatDiag, n_output=c).to_torch(),)


def _gram(model, loader, c):
    return (GramMatrix(model, loader).to_torch(),)


def _jacobian(model, loader, c):
    return (Jacobian(model, loader).to_torch(),)


def _push_forward_implicit(model, loader, c):
    return (Jacobian(model, loader, representation=PushForwardImplicit).mv(PVector.from_model(model)).to_torch(),)


def _pull_back(model, loader, c):
    u = torch.randn(c, N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return (Jacobian(model, loader, representation=PullBackDense).mv(FVector(u)).to_torch(),)


REPRESENTATIONS = [PMatDense, PMatDiag, PMatBlockDiag, PMatKFAC, PMatEKFAC, PMatQuasiDiag,
                   PMatLowRank, PMatImplicit]
QUANTITIES = {
    **{rep.__name__: _fim(rep) for rep in REPRESENTATIONS},
    "PMatEKFAC-update_diag": _fim(PMatEKFAC, update_diag=True),
    "PMatMixed": _fim({"Linear": PMatKFAC, "default": PMatDiag}),
    "FIM_MonteCarlo": _monte_carlo,
    "FIM-n_output": _n_output_checked,
    "GramMatrix": _gram,
    "Jacobian": _jacobian,
    "PushForwardImplicit": _push_forward_implicit,
    "PullBackDense": _pull_back,
}


# ------------------------------------------------------------------------------ one process


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_an_empty_batch_changes_nothing(quantity, position):
    model, batches, c = _problem()
    compute = QUANTITIES[quantity]
    _assert_same(compute(model, _with_empty(batches, position), c), compute(model, batches, c))


@pytest.mark.parametrize("quantity", ["PMatKFAC", "PMatImplicit", "GramMatrix", "Jacobian"])
def test_a_sampler_yielding_an_empty_index_list(quantity):
    """A DataLoader (conv model) whose batch sampler yields ``[]`` between two batches."""
    model, batches, c = _problem("conv2d")
    loader = _index_loader(batches, [[0, 1, 2, 3], [], [4, 5, 6, 7, 8]])
    x, y = _examples(batches)
    plain = [(x[:4], y[:4]), (x[4:], y[4:])]
    compute = QUANTITIES[quantity]
    _assert_same(compute(model, loader, c), compute(model, plain, c))


@pytest.mark.parametrize("kind", ["list", "DataLoader"])
@pytest.mark.parametrize("quantity", list(QUANTITIES))
def test_a_loader_of_only_empty_batches_is_an_empty_loader(quantity, kind):
    model, batches, c = _problem()
    if kind == "list":
        loader = [_empty_like(batches[0])] * 2
    else:
        loader = _index_loader(batches, [[], []])
    with pytest.raises(ValueError) as e:
        QUANTITIES[quantity](model, loader, c)
    assert str(e.value) == NO_EXAMPLE


def test_the_empty_loader_error_names_the_problem_and_the_fix():
    assert "no example was seen" in NO_EXAMPLE and "batches of 0 examples" in NO_EXAMPLE
    assert "pass a loader that yields at least one example" in NO_EXAMPLE
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="no example was seen"):
        GramMatrix(model, [])  # a loader of length 0: the same error


def test_batch_examples():
    x = torch.zeros(4, 2)
    assert batch_examples(x) == 4 and batch_examples((x, x[:, 0])) == 4
    assert batch_examples((torch.tensor(1.0), x[:0])) == 0  # a 0-d tensor tells nothing
    assert batch_examples(["a", 3]) is None and not is_empty_batch(["a", 3])
    assert is_empty_batch((x[:0], torch.zeros(0, dtype=torch.long)))


# ------------------------------------------------------------------------------ stores


@pytest.mark.parametrize("helper", [GramMatrix, Jacobian])
def test_store_with_a_loader_yielding_an_empty_batch(helper, tmp_path):
    """The store reads the examples of each tile by index from ``loader.dataset`` (its
    sampler is not used): an empty index list in the sampler changes nothing."""
    model, batches, c = _problem()
    loader = _index_loader(batches, [[0, 1, 2], [], [3, 4, 5, 6, 7, 8]])
    got = helper(model, loader, store=str(tmp_path / "s.zarr"), tile=4, progress=False).to_torch()
    torch.testing.assert_close(torch.as_tensor(got), helper(model, batches).to_torch(), **TOL)


# ------------------------------------------------------------------------------ a group


def _group_quantities(model, loader) -> dict:
    """Every quantity whose group path iterates the shard differently: statistics + reduce,
    row-sharded Jacobian rows, the implicit maps, the Gram exchange of each kind."""
    out = {
        "PMatKFAC": FIM(model, loader, PMatKFAC).to_torch(),
        "PMatLowRank": FIM(model, loader, PMatLowRank).to_torch(),
        "PMatImplicit": torch.stack([t.reshape(()) for t in _implicit_ops(FIM(model, loader, PMatImplicit))[::3]]),
        "Jacobian": Jacobian(model, loader).to_torch(),
        "PushForwardImplicit": Jacobian(model, loader, representation=PushForwardImplicit)
        .mv(PVector.from_model(model)).to_torch(),
    }
    for exchange in ("features", "inputs", "auto"):
        out[f"Gram/{exchange}"] = GramMatrix(model, loader, exchange=exchange).to_torch()
    return out


def _raises_no_example(fn) -> bool:
    try:
        fn()
    except ValueError as e:
        return str(e) == NO_EXAMPLE
    return False


def _in_group(rank, world):
    """Rank 0: batches 0, 1 with an empty batch first; rank 1: batch 2 with an empty one
    after it, or only empty batches (an empty shard); then every rank only empty batches."""
    torch.set_num_threads(1)
    model, batches, c = _problem()
    mine = batches[:2] if rank == 0 else batches[2:]
    with_empty = [_empty_like(batches[0])] + mine if rank == 0 else mine + [_empty_like(batches[0])]
    only_empty = mine if rank == 0 else [_empty_like(batches[0])] * 2
    errors = {}
    for case, (got_loader, want_loader) in {"one empty batch": (with_empty, mine),
                                            "empty shard": (only_empty, mine if rank == 0 else [])}.items():
        got, want = _group_quantities(model, got_loader), _group_quantities(model, want_loader)
        errors[case] = {k: (got[k] - want[k]).abs().max().item() for k in want}
    none = [_empty_like(batches[0])]
    raised = {
        "FIM": _raises_no_example(lambda: FIM(model, none, PMatDense)),
        "Gram": _raises_no_example(lambda: GramMatrix(model, none, exchange="inputs")),
        "Jacobian": _raises_no_example(lambda: Jacobian(model, none)),
        "PMatImplicit": _raises_no_example(lambda: FIM(model, none, PMatImplicit).trace()),
    }
    return errors, raised


@pytest.mark.dist
def test_a_group_with_empty_batches_on_one_rank():
    """2 gloo ranks: the same collectives run on every rank whether a rank's shard holds
    an empty batch, only empty batches, or (on every rank) nothing."""
    for rank, (errors, raised) in enumerate(run_ranks(_in_group, 2, timeout=120)):
        for case, errs in errors.items():
            bad = {k: e for k, e in errs.items() if not e <= 1e-12}
            assert not bad, f"rank {rank}, {case}: {bad}"
        assert all(raised.values()), f"rank {rank}: {raised}"
