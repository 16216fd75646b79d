"""The statistics -> reduce -> finalise seam (issue 2 item 7, DESIGN.md §3).

For PMatDense, PMatDiag and PMatBlockDiag: the generator's additive statistics over two
disjoint halves of a dataset, added with ``+`` and finalised with ``from_statistics``,
give the whole-dataset FIM (relative error <= 1e-12), whatever the split and the batching.
The distributed issue builds on exactly this seam.
"""
from __future__ import annotations

import pytest
import torch

import oracle
from checks import rel
from models import MODELS, loader_of, make, variant_of

from nngeo_dist import FIM
from nngeo_dist.generator import Generator
from nngeo_dist.generator.statistics import Statistics
from nngeo_dist.generator.variants import fim_root
from nngeo_dist.object import PMatBlockDiag, PMatDense, PMatDiag

RTOL = 1e-12
ALL = list(MODELS)
pm = pytest.mark.parametrize



STAT_METHOD = {
    PMatDense: "dense_statistics",
    PMatDiag: "diag_statistics",
    PMatBlockDiag: "block_statistics",
}
REPS = list(STAT_METHOD)
REP_IDS = [r.__name__ for r in REPS]


def matrix(M) -> torch.Tensor:
    return M.to_torch()


def split(batches, k):
    """The examples of ``batches`` cut at example ``k``: two lists of (x, y) tensors."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return (x[:k], y[:k]), (x[k:], y[k:])


_CASES: dict = {}


def case(name):
    if name not in _CASES:
        model, batches, c = make(name)
        variant = variant_of(c)
        gen = Generator(model, fim_root(lambda *b: model(b[0]), variant))
        whole = {rep: FIM(model, loader_of(batches), rep, variant=variant) for rep in REPS}
        _CASES[name] = (model, batches, c, variant, gen, whole)
    return _CASES[name]


@pm("name", ALL)
@pm("rep", REPS, ids=REP_IDS)
def test_two_halves_give_the_whole(name, rep):
    model, batches, c, variant, gen, whole = case(name)
    (x1, y1), (x2, y2) = split(batches, 7)  # 11 examples: 7 + 4, uneven
    L1 = loader_of([(x1, y1)], batch_size=3)  # 3, 3, 1: batching differs from the whole
    L2 = loader_of([(x2, y2)], batch_size=4)
    method = STAT_METHOD[rep]
    s1 = getattr(gen, method)(L1)
    s2 = getattr(gen, method)(L2)
    assert isinstance(s1, Statistics)
    assert (s1.count, s2.count) == (7, 4)
    total = s1 + s2
    assert total.count == 11
    M = rep.from_statistics(gen.layer_collection, total, generator=gen)
    assert type(M) is rep
    assert rel(matrix(M), matrix(whole[rep])) <= RTOL
    # the classmethod route names the same statistics
    s1b = rep.statistics(gen, L1)
    assert set(s1b.sums) == set(s1.sums)
    for k in s1.sums:
        assert torch.equal(s1b.sums[k], s1.sums[k])


@pm("rep", REPS, ids=REP_IDS)
def test_halves_against_oracle(rep):
    """Independently of FIM(): the finalised sum of the halves is the oracle's FIM (or its
    diagonal / diagonal blocks)."""
    model, batches, c, variant, gen, _ = case("mixed_cnn")
    (x1, y1), (x2, y2) = split(batches, 5)
    method = STAT_METHOD[rep]
    total = getattr(gen, method)(loader_of([(x1, y1)], 2)) + getattr(gen, method)(loader_of([(x2, y2)], 6))
    M = rep.from_statistics(gen.layer_collection, total, generator=gen)
    F = oracle.fim_dense(model, batches, variant)
    if rep is PMatDiag:
        assert rel(M.get_diag(), torch.diagonal(F)) <= 1e-10
    elif rep is PMatBlockDiag:
        lc = gen.layer_collection
        for lname, layer in lc.layers.items():
            s, e = lc.p_pos[lname], lc.p_pos[lname] + layer.numel()
            assert rel(M.to_torch()[s:e, s:e], F[s:e, s:e]) <= 1e-10
    else:
        assert rel(M.to_torch(), F) <= 1e-10


@pm("rep", REPS, ids=REP_IDS)
def test_statistics_are_sums_not_means(rep):
    """Statistics hold sums: one half's sums finalised alone give that half's FIM, and the
    sums of the halves add to the sums of the whole."""
    model, batches, c, variant, gen, _ = case("conv1d")
    (x1, y1), (x2, y2) = split(batches, 3)
    method = STAT_METHOD[rep]
    s1 = getattr(gen, method)(loader_of([(x1, y1)], 2))
    s2 = getattr(gen, method)(loader_of([(x2, y2)], 5))
    sw = getattr(gen, method)(loader_of(batches))
    for k in sw.sums:
        assert rel(s1.sums[k] + s2.sums[k], sw.sums[k]) <= RTOL
    M1 = rep.from_statistics(gen.layer_collection, s1, generator=gen)
    F1 = FIM(model, loader_of([(x1, y1)]), rep, variant=variant)
    assert rel(matrix(M1), matrix(F1)) <= RTOL


def test_statistics_add_refuses_different_names():
    _, _, _, _, gen, _ = case("linear")
    _, batches, _ = make("linear")
    a = gen.dense_statistics(loader_of(batches))
    b = gen.diag_statistics(loader_of(batches))
    with pytest.raises(ValueError, match="different names"):
        a + b


def test_statistics_of_an_empty_half_finalise_with_a_clear_error():
    """An empty shard contributes zero sums and count 0 (it must still take part in a
    reduction); finalising statistics that saw no example at all is refused."""
    _, batches, _, _, gen, _ = case("linear")
    empty = []
    s = gen.diag_statistics(empty)
    assert s.count == 0
    assert s.sums["diag"].shape == (gen.layer_collection.numel(),)
    assert torch.count_nonzero(s.sums["diag"]) == 0
    with pytest.raises(ValueError, match="no example was seen"):
        PMatDiag.from_statistics(gen.layer_collection, s, generator=gen)
    # an empty half added to a full one changes nothing
    full = gen.diag_statistics(loader_of(batches))
    both = s + full
    assert both.count == full.count
    assert torch.equal(both.sums["diag"], full.sums["diag"])


def test_dense_statistics_declared_symmetric():
    """Dense and block sums are flagged symmetric (a reduction may send triangles), and
    are."""
    _, batches, _, _, gen, _ = case("linear")
    L = loader_of(batches)
    assert "dense" in gen.dense_statistics(L).symmetric
    blocks = gen.block_statistics(L)
    assert set(blocks.symmetric) == set(blocks.sums)
    for k, t in blocks.sums.items():  # symmetric up to rounding
        assert rel(t.t(), t) <= 1e-13
