"""Bad inputs to the command lines and to ``shard_loader``: refused with a message naming
the option or the ranks, never run with something else than asked, never a hang.

- a batch size or a number of Monte-Carlo draws below 1, and keyword arguments that are not
  a JSON object, are refused by the argument parser, naming the option;
- ``shard_loader`` refuses ``batch_size=0`` (it used to run with 1), and, on ranks that see
  datasets of different lengths, raises on every rank an error naming each rank's length
  (it used to shard each rank's own length: examples counted twice or not at all);
- ``ntk``: a rank that fails while loading its inputs is named on every rank.

The distributed cases call the commands' ``main`` inside the ranks of a real gloo group
(``dist_harness.run_ranks``: ``init_from_env`` finds the group already joined), which takes
a second where a torchrun would take ten.
"""
from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import user_model
from nngeo_dist import fim, ntk
from nngeo_dist.cli_common import load_data, load_model
from nngeo_dist.dist import RankFailedError, shard_loader

try:
    from dist_harness import run_ranks
except ImportError:  # tests/ imported as a package
    from tests.dist_harness import run_ranks

USER = ["--model", "user_model:mlp", "--data", "user_model:blobs", "--no-progress"]


# ------------------------------------------------------------------ data factories (by rank)


def blobs_longer_on_rank1() -> user_model.Blobs:
    """A node-local copy that is out of date on one node: rank 1 sees 41 examples, others 40."""
    return user_model.blobs(n=41 if os.environ.get("RANK") == "1" else 40)


def blobs_missing_on_rank1() -> user_model.Blobs:
    if os.environ.get("RANK") == "1":
        raise FileNotFoundError("/data/train.npy is missing on this node")
    return user_model.blobs(n=40)


def _error_of(call):
    """(exception type name, message) of what ``call()`` raised, or None."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return type(exc).__name__, str(exc)
    return None


# ------------------------------------------------------------------ argument parser


@pytest.mark.parametrize("parse, option, value, expected", [
    (fim.parse_args, "--batch-size", "0", "positive whole number of examples"),
    (ntk.parse_args, "--batch-size", "-3", "positive whole number of examples"),
    (fim.parse_args, "--trials", "0", "positive whole number of draws (leave --trials out for the closed-form"),
    (fim.parse_args, "--model-kwargs", "{depth: 3}", "'{depth: 3}' is not valid JSON"),
    (fim.parse_args, "--data-kwargs", "[1, 2]", "is a JSON list, not an object"),
    (ntk.parse_args, "--data-kwargs", "n=5", "'n=5' is not valid JSON"),
])
def test_parser_refuses_bad_values_naming_the_option(parse, option, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse([option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and expected in err


def test_loaders_name_the_option_of_bad_json():
    with pytest.raises(ValueError, match=r"--model-kwargs '\{depth: 3\}' is not valid JSON"):
        load_model("user_model:mlp", "{depth: 3}")
    with pytest.raises(ValueError, match=r"--data-kwargs 'n=5' is not valid JSON"):
        load_data("user_model:blobs", "n=5")


def test_help_says_what_resume_does_in_each_command():
    ntk_help = " ".join(ntk_parser_help().split())
    assert "tile by tile" in ntk_help and "incomplete one is recomputed" not in ntk_help
    fim_help = " ".join(fim.build_parser().format_help().split())
    assert "statistically equivalent, not identical" in fim_help


def ntk_parser_help() -> str:
    """What ``ntk --help`` prints (its parser is built inside parse_args)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        ntk.parse_args(["--help"])
    return buf.getvalue()


# ------------------------------------------------------------------ shard_loader


def test_shard_loader_refuses_batch_size_zero():
    data = TensorDataset(torch.arange(10.0))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size={bad!r}: pass a positive whole number"):
            shard_loader(data, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size=0"):
        shard_loader(DataLoader(data, batch_size=4), batch_size=0)
    assert [len(b) for (b,) in shard_loader(data, batch_size=4)] == [4, 4, 2]


def _shard_with_lengths(rank, world, lengths, batch_sizes):
    data = TensorDataset(torch.arange(float(lengths[rank])))
    return _error_of(lambda: shard_loader(data, batch_size=batch_sizes[rank]))


@pytest.mark.dist
def test_shard_loader_lengths_differing_between_ranks_raise_on_every_rank():
    errors = run_ranks(_shard_with_lengths, 3, [50, 60, 50], [4, 4, 4], timeout=60)
    for kind, message in errors:
        assert kind == "ValueError"
        assert "different length on each rank (ranks 0, 2: 50 examples; rank 1: 60 examples)" in message


@pytest.mark.dist
def test_shard_loader_bad_argument_on_one_rank_raises_on_every_rank():
    errors = run_ranks(_shard_with_lengths, 2, [10, 10], [4, 0], timeout=60)
    assert errors[1][0] == "ValueError" and "batch_size=0" in errors[1][1]
    assert errors[0][0] == "RankFailedError" and "rank 1: ValueError: batch_size=0" in errors[0][1]


# ------------------------------------------------------------------ the commands on 2 ranks


def _fim_main(rank, world, argv):
    return _error_of(lambda: fim.main(argv))


@pytest.mark.dist
@pytest.mark.parametrize("resume", [False, True])
def test_fim_data_of_different_lengths_fails_on_every_rank(tmp_path, resume):
    out = tmp_path / "F.zarr"
    args = ["--model", "user_model:mlp", "--data", "test_cli_inputs:blobs_longer_on_rank1",
            "--repr", "diag", "--out", str(out), "--no-progress"]
    if resume:  # rank 0 alone finds a finished store of its own 40 examples
        assert fim.main(args)["n"] == 40
        args.append("--resume")
    errors = run_ranks(_fim_main, 2, args, timeout=60)
    for kind, message in errors:
        assert kind == "ValueError" and "rank 0: 40 examples; rank 1: 41 examples" in message
    assert out.exists() == resume


def _ntk_main(rank, world, argv):
    return _error_of(lambda: ntk.main(argv))


@pytest.mark.dist
def test_ntk_rank_failing_to_load_its_data_is_named_on_every_rank(tmp_path):
    out = tmp_path / "K.zarr"
    args = ["--model", "user_model:mlp", "--data", "test_cli_inputs:blobs_missing_on_rank1",
            "--n-examples", "8", "--tile", "4", "--out", str(out), "--no-progress"]
    errors = run_ranks(_ntk_main, 2, args, timeout=60)
    assert errors[1] == ("FileNotFoundError", "/data/train.npy is missing on this node")
    kind, message = errors[0]
    assert kind == RankFailedError.__name__
    assert "rank 1 of the process group failed" in message and "/data/train.npy is missing" in message
    assert not out.exists()
