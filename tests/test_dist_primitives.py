"""Distributed primitives on real gloo process groups of 1, 2 and 3 ranks.

Each ``_on_*`` function runs inside every rank (see ``dist_harness.run_ranks``) and returns
plain values; the assertions are made in the parent.
"""
from __future__ import annotations


import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nngeo_dist.dist import errors, fingerprint, group, reduce, sharding
from nngeo_dist.generator.statistics import Statistics

try:
    from dist_harness import RankError, run_ranks
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import RankError, run_ranks

WORLDS = [1, 2, 3]


# ---------------------------------------------------------------- sharding (no processes)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 10, 11, 100])
def test_shard_range_partitions_exactly(n, world):
    blocks = [sharding.shard_range(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("n, world", [(0, 3), (2, 3), (10, 3), (17, 4)])
def test_shard_sampler_with_seed_partitions_a_permutation(n, world):
    seen = [i for r in range(world) for i in sharding.ShardSampler(n, r, world, seed=5)]
    assert sorted(seen) == list(range(n))
    assert [len(sharding.ShardSampler(n, r, world)) for r in range(world)] == [
        len(sharding.shard_range(n, r, world)) for r in range(world)]
    if n > 3:
        assert seen != list(range(n))


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank 3"):
        sharding.shard_range(5, 3, 3)
    with pytest.raises(ValueError, match=">= 0"):
        sharding.shard_range(-1, 0, 1)


def test_shard_loader_single_process_keeps_loader_settings():
    data = TensorDataset(torch.arange(10.0))
    loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                        collate_fn=lambda b: [x[0] for x in b])
    sharded = sharding.shard_loader(loader)
    batches = list(sharded)
    assert [len(b) for b in batches] == [4, 4, 2]  # drop_last is not carried: exact
    assert [float(x) for b in batches for x in b] == list(range(10))
    with pytest.raises(ValueError, match="drop_last"):
        sharding.shard_loader(data, drop_last=True)
    with pytest.raises(ValueError, match="shuffle"):
        sharding.shard_loader(data, shuffle=True)


# ---------------------------------------------------------------- group helpers


def test_group_helpers_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert group.init_from_env() is None
    assert group.resolve_group(None) is None
    assert (group.rank(None), group.world_size(None)) == (0, 1)
    assert group.collective_device(None) == torch.device("cpu")
    assert group.device_for_rank() == torch.device("cpu")
    stats = Statistics({"a": torch.ones(2)}, 3)
    assert reduce.all_reduce_statistics(stats, None) is stats


def test_resolve_timeout(monkeypatch):
    monkeypatch.delenv(group.TIMEOUT_ENV, raising=False)
    assert group.resolve_timeout().total_seconds() == 600
    monkeypatch.setenv(group.TIMEOUT_ENV, "42")
    assert group.resolve_timeout().total_seconds() == 42
    assert group.resolve_timeout(7).total_seconds() == 7
    monkeypatch.setenv(group.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="NNGEO_DIST_TIMEOUT"):
        group.resolve_timeout()


def _on_group(rank, world):
    import torch.distributed as dist

    g = group.init_from_env()  # already initialised by the harness: idempotent
    return (g is dist.group.WORLD, group.rank(), group.world_size(),
            str(group.collective_device()), group.resolve_group(None) is dist.group.WORLD)


@pytest.mark.parametrize("world", WORLDS)
def test_group_helpers_in_process_group(world):
    out = run_ranks(_on_group, world)
    assert out == [(True, r, world, "cpu", True) for r in range(world)]


# ---------------------------------------------------------------- sharded loaders


def _on_shard_loader(rank, world, n, seed):
    data = TensorDataset(torch.arange(n))
    loader = DataLoader(data, batch_size=3)
    return [int(x) for (b,) in sharding.shard_loader(loader, seed=seed) for x in b]


@pytest.mark.parametrize("world", WORLDS)
def test_shard_loader_covers_every_example_once(world):
    for n, seed in [(0, None), (2, None), (11, None), (11, 3)]:
        per_rank = run_ranks(_on_shard_loader, world, n, seed)
        assert sorted(i for idx in per_rank for i in idx) == list(range(n))
        if seed is None:
            assert per_rank == [list(sharding.shard_range(n, r, world)) for r in range(world)]


# ---------------------------------------------------------------- statistics reduction


def _rank_statistics(rank, world, m=5):
    """Float64 symmetric (batched too), float32 and int64 sums; the last rank is empty."""
    empty = world > 1 and rank == world - 1
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, m, m, dtype=torch.float64, generator=gen)
    y = torch.randn(m + 2, m + 2, dtype=torch.float64, generator=gen)
    sums = {
        "A": x + x.transpose(-1, -2),
        "G": y @ y.T,
        "diag": torch.randn(7, dtype=torch.float64, generator=gen),
        "f32": torch.randn(3, 4, generator=gen),
        "hits": torch.arange(4, dtype=torch.int64) * (rank + 1),
    }
    if empty:
        sums = {k: torch.zeros_like(v) for k, v in sums.items()}
    count = 0 if empty else 2**52 + rank  # beyond float32, exact in int64
    return Statistics(sums, count, frozenset({"A", "G"}))


def _on_reduce_statistics(rank, world, bucket_bytes):
    stats = _rank_statistics(rank, world)
    if bucket_bytes == reduce.DEFAULT_BUCKET_BYTES:
        return stats.reduce()  # Statistics.reduce goes through all_reduce_statistics
    return reduce.all_reduce_statistics(stats, None, bucket_bytes)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("bucket_bytes", [reduce.DEFAULT_BUCKET_BYTES, 40])
def test_all_reduce_statistics_is_the_sum(world, bucket_bytes):
    expected = _rank_statistics(0, world)
    for r in range(1, world):
        expected = expected + _rank_statistics(r, world)
    for got in run_ranks(_on_reduce_statistics, world, bucket_bytes):
        assert got.count == expected.count
        assert got.symmetric == expected.symmetric
        assert list(got.sums) == list(expected.sums)
        for name, want in expected.sums.items():
            have = got.sums[name]
            assert have.dtype == want.dtype and have.shape == want.shape, name
            tol = 1e-12 if want.dtype == torch.float64 else 1e-6
            assert torch.allclose(have, want, rtol=tol, atol=tol * want.abs().max()), name
        for name in got.symmetric if world > 1 else ():  # one process: stats as given
            assert torch.equal(got.sums[name], got.sums[name].transpose(-1, -2))


def _on_packed_bytes(rank, world, m):
    x = torch.randn(m, m, dtype=torch.float64)
    reduce.reset_bytes_reduced()
    reduce.all_reduce_statistics(Statistics({"F": x + x.T}, 1, frozenset({"F"})))
    return reduce.bytes_reduced(), reduce.bytes_naive()


@pytest.mark.parametrize("world", [2, 3])
def test_symmetric_sums_travel_packed(world):
    m = 300
    for sent, naive in run_ranks(_on_packed_bytes, world, m):
        assert naive == m * m * 8
        assert sent <= 0.55 * naive


def _on_mismatch(rank, world, kind):
    stats = _rank_statistics(rank, world)
    if rank == 1 and kind == "shape":
        stats.sums["G"] = torch.zeros(3, 3, dtype=torch.float64)
    if rank == 1 and kind == "name":
        stats.sums["extra"] = stats.sums.pop("diag")
    try:
        reduce.all_reduce_statistics(stats)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind, words", [("shape", ["'G'", "(3, 3)", "rank 1"]),
                                         ("name", ["'extra'", "'diag'", "missing"])])
def test_mismatched_statistics_raise_on_every_rank(world, kind, words):
    messages = run_ranks(_on_mismatch, world, kind, timeout=60)
    for message in messages:
        assert message is not None
        for word in words:
            assert word in message


# ---------------------------------------------------------------- tensors and objects


def _on_tensor_helpers(rank, world):
    t = torch.full((2, 3), float(rank + 1))
    total = reduce.all_reduce_tensor(t)
    untouched = torch.equal(t, torch.full((2, 3), float(rank + 1)))
    obj = reduce.broadcast_object({"from": rank, "x": torch.arange(3) + rank}, src=world - 1)
    mine = torch.arange(6, dtype=torch.float64).reshape(2, 3) if rank == 0 else None
    shared = reduce.broadcast_tensor(mine, src=0)
    rows = torch.arange(rank * 2, dtype=torch.float64).reshape(rank, 2)  # rank 0: no rows
    gathered = reduce.all_gather_tensors_varlen(rows)
    empty = reduce.all_gather_tensors_varlen(torch.zeros(0, 4))
    try:
        reduce.all_gather_tensors_varlen(torch.zeros(1, 2 + (rank == world - 1)))
        mismatch = None
    except ValueError as exc:
        mismatch = str(exc)
    return total, untouched, obj, shared, gathered, empty.shape, mismatch


@pytest.mark.parametrize("world", WORLDS)
def test_tensor_and_object_helpers(world):
    s = world * (world + 1) / 2
    expected_rows = torch.cat([torch.arange(r * 2, dtype=torch.float64).reshape(r, 2)
                               for r in range(world)])
    for total, untouched, obj, shared, gathered, empty_shape, mismatch in run_ranks(
            _on_tensor_helpers, world):
        assert torch.equal(total, torch.full((2, 3), s)) and untouched
        assert torch.equal(shared, torch.arange(6, dtype=torch.float64).reshape(2, 3))
        assert obj["from"] == world - 1 and torch.equal(obj["x"], torch.arange(3) + world - 1)
        assert torch.equal(gathered, expected_rows)
        assert tuple(empty_shape) == (0, 4)
        if world > 1:
            assert "trailing shape" in mismatch and f"rank {world - 1}" in mismatch


# ---------------------------------------------------------------- fingerprints


def test_parameter_fingerprint_is_deterministic():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    b = torch.nn.Linear(3, 2)
    assert fingerprint.parameter_fingerprint(a) == fingerprint.parameter_fingerprint(b)
    with torch.no_grad():
        b.bias[0] += 1e-7
    assert fingerprint.parameter_fingerprint(a) != fingerprint.parameter_fingerprint(b)
    bf = [p.to(torch.bfloat16) for p in a.parameters()]
    assert len(fingerprint.parameter_fingerprint(bf)) == 64


def _on_fingerprint(rank, world, differ):
    torch.manual_seed(rank if differ and rank == world - 1 else 0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    try:
        return fingerprint.check_same_parameters(model)
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("world", WORLDS)
def test_same_parameters_pass(world):
    prints = run_ranks(_on_fingerprint, world, False)
    assert len(set(prints)) == 1 and len(prints[0]) == 64


@pytest.mark.parametrize("world", [2, 3])
def test_different_parameters_raise_on_every_rank(world):
    for exc in run_ranks(_on_fingerprint, world, True, timeout=60):
        assert isinstance(exc, RuntimeError)
        message = str(exc)
        assert "the model parameters differ between ranks" in message
        assert str(world - 1) in message and "load the same weights on every rank" in message


def _on_settings(rank, world):
    settings = {"data": "e9b1c" * 13, "tile": str(4 * (rank + 1)), "dtype": "float64"}
    try:
        fingerprint.check_same_across_ranks(settings, "the settings of the job", hint="fix it")
    except RuntimeError as exc:
        return str(exc)


def test_settings_that_differ_are_named():
    """A mapping of settings: the message names each setting that differs, with every
    rank's value (not the first characters of one long string, which were all alike)."""
    for message in run_ranks(_on_settings, 2, timeout=60):
        assert message == ("the settings of the job differ between ranks 0 and 1: "
                           "tile (rank 0: 4; rank 1: 8); fix it"), message


# ---------------------------------------------------------------- fault handling


def _on_failure(rank, world, failing):
    def work():
        if rank in failing:
            raise ValueError(f"boom on {rank}")
        return rank * 10

    try:
        return errors.run_collectively(work)
    except errors.RankFailedError as exc:
        return ("RankFailedError", exc.failed_ranks, str(exc))
    except ValueError as exc:
        return ("ValueError", str(exc))


@pytest.mark.parametrize("world", WORLDS)
def test_run_collectively_without_failure_returns(world):
    assert run_ranks(_on_failure, world, []) == [10 * r for r in range(world)]


@pytest.mark.parametrize("world, failing", [(1, [0]), (2, [1]), (3, [1]), (3, [0, 2])])
def test_one_failing_rank_raises_on_every_rank(world, failing):
    for rank, out in enumerate(run_ranks(_on_failure, world, failing, timeout=60)):
        if rank in failing:
            assert out == ("ValueError", f"boom on {rank}")
        else:
            kind, failed, message = out
            assert kind == "RankFailedError" and failed == failing
            assert all(f"rank {r}: ValueError: boom on {r}" in message for r in failing)


# ---------------------------------------------------------------- the harness itself


def _on_raise(rank, world):
    if rank == 1:
        raise KeyError("only rank 1")
    return rank


def _on_hang(rank, world):
    import time

    if rank == 1:
        time.sleep(600)
    return rank


def test_harness_reports_the_failing_rank():
    with pytest.raises(RankError, match="rank 1 raised KeyError") as info:
        run_ranks(_on_raise, 2)
    assert info.value.rank == 1 and isinstance(info.value.__cause__, KeyError)


def test_harness_kills_a_hang():
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] did not finish within 4"):
        run_ranks(_on_hang, 2, timeout=4)


# ---------------------------------------------------------------- exchange (row-sharded objects)


def _on_exchange(rank, world):
    from nngeo_dist.dist import exchange

    cols = torch.arange(2 * rank * 3, dtype=torch.float64).reshape(2, rank, 3) + 100 * rank
    everything = exchange.all_gather_rows(cols, dim=1)
    at_last = exchange.gather_rows(cols, dim=1, dst=world - 1)
    total = exchange.reduce_tensor(torch.full((2, 2), float(rank + 1)), dst=0)
    mine = torch.arange(4, dtype=torch.int64) * 7 if rank == world - 1 else None
    known = exchange.broadcast_from(mine, world - 1, shape=(4,), dtype=torch.int64)
    unknown = exchange.broadcast_from(mine, world - 1)
    objs = None
    if rank == world - 1:
        objs = [
            (3, [{"a": torch.ones(2, 2), "b": ("pairwise", torch.arange(3), True)}]),
            {"mask": torch.tensor([True, False]), "half": torch.zeros(2, dtype=torch.float16), "s": "x"},
        ]
    received = list(exchange.broadcast_structures(objs, src=world - 1))
    nothing = list(exchange.broadcast_structures([] if rank == 0 else None, src=0))
    return everything, at_last, total, known, unknown, received, nothing


@pytest.mark.parametrize("world", WORLDS)
def test_exchange_helpers(world):
    expected = torch.cat([torch.arange(2 * r * 3, dtype=torch.float64).reshape(2, r, 3) + 100 * r
                          for r in range(world)], dim=1)
    for rank, (everything, at_last, total, known, unknown, received, nothing) in enumerate(
            run_ranks(_on_exchange, world)):
        assert torch.equal(everything, expected)
        assert (at_last is None) == (rank != world - 1)
        if at_last is not None:
            assert torch.equal(at_last, expected)
        if rank == 0:
            assert torch.equal(total, torch.full((2, 2), world * (world + 1) / 2))
        else:
            assert total is None
        assert torch.equal(known, torch.arange(4) * 7) and torch.equal(unknown, known)
        (n, [feats]), other = received
        assert n == 3 and torch.equal(feats["a"], torch.ones(2, 2))
        assert feats["b"][0] == "pairwise" and feats["b"][2] is True
        assert torch.equal(feats["b"][1], torch.arange(3))
        assert other["mask"].dtype == torch.bool and other["mask"].tolist() == [True, False]
        assert other["half"].dtype == torch.float16 and other["s"] == "x"
        assert nothing == []


def test_model_fingerprint_covers_buffers_and_follows_changes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    first = fingerprint.model_fingerprint(model)
    assert fingerprint.model_fingerprint(model) == first  # deterministic
    model[0].bias.data.mul_(2.0)  # through .data: no version counter sees it
    assert fingerprint.model_fingerprint(model) != first
    model[0].bias.data.div_(2.0)  # exact: back to the same bytes
    assert fingerprint.model_fingerprint(model) == first
    model[1].running_mean.add_(1.0)  # a buffer changed in place
    second = fingerprint.model_fingerprint(model)
    assert second != first
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert fingerprint.model_fingerprint(model) not in (first, second)
    model[0].weight = torch.nn.Parameter(torch.zeros(2, 3))  # a parameter replaced
    assert fingerprint.model_fingerprint(model) == fingerprint.parameter_fingerprint(
        {**dict(model.named_parameters()),
         **{"buffer:" + k: b for k, b in model.named_buffers()}})
    assert fingerprint.check_same_model(model, None) == fingerprint.model_fingerprint(model)
