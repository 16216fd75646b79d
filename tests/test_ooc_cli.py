"""``python -m nngeo_dist.ntk`` end to end (issue 5): one process, ``torchrun`` with 2 ranks,
a run killed with SIGKILL in the middle of a tile then resumed (no finished tile is
recomputed), and the refusals (existing store, other settings, bad arguments)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from nngeo_dist import ntk
from nngeo_dist.store import StoreMismatchError, gram_tiles
from nngeo_dist.store.job import FAULT_ENV, TILE_LOG_ENV, read_tile_log

ROOT = Path(__file__).resolve().parents[1]
N, TILE = 40, 8  # 5 row tiles, 15 tiles I <= J; c = 10 outputs
ARGS = ["--n-examples", str(N), "--tile", str(TILE), "--dtype", "float64", "--no-progress",
        "--model-kwargs", '{"train_steps": 0}']


def run_cli(args, env_extra=None, torchrun=False, timeout=180):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "nngeo_dist.ntk"]
    else:
        cmd = [sys.executable, "-m", "nngeo_dist.ntk"]
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def summary_of(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(lines[0])


def data(path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["data"][...])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "gram.zarr"
    proc = run_cli(ARGS + ["--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, summary_of(proc)


def test_cli_one_process_equals_in_memory(one_process):
    from torch.utils.data import DataLoader, Subset

    from nngeo_dist import GramMatrix
    from nngeo_dist.cli_common import digits_dataset, load_model

    out, s = one_process
    assert (s["n"], s["c"], s["tile"], s["tiles"], s["tiles_computed"]) == (N, 10, TILE, 15, 15)
    assert s["bytes"] == (10 * N) ** 2 * 8 and s["bytes_written"] == s["bytes"]
    assert s["world_size"] == 1 and s["seconds"] > 0
    model = load_model("digits_mlp", '{"train_steps": 0}', dtype=torch.float64)
    ds = Subset(digits_dataset(torch.float64), range(N))
    ref = GramMatrix(model, DataLoader(ds, batch_size=16)).to_torch().numpy()
    assert np.abs(data(out) - ref).max() <= 1e-10 * np.abs(ref).max()
    assert abs(s["trace"] - float(np.einsum("aiai->", ref))) <= 1e-9 * abs(s["trace"])


def test_cli_torchrun_two_ranks(one_process, tmp_path):
    out = tmp_path / "gram.zarr"
    proc = run_cli(ARGS + ["--out", str(out)], torchrun=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = summary_of(proc)
    assert s["world_size"] == 2 and s["tiles_computed"] == 15
    ref = data(one_process[0])
    assert np.abs(data(out) - ref).max() <= 1e-10 * np.abs(ref).max()


def test_cli_killed_mid_tile_then_resumed(one_process, tmp_path):
    out, log1, log2 = tmp_path / "gram.zarr", str(tmp_path / "run1.log"), str(tmp_path / "run2.log")
    killed = run_cli(ARGS + ["--out", str(out)], {FAULT_ENV: "4", TILE_LOG_ENV: log1})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    first = {t for _, t in read_tile_log(log1)}
    assert len(first) == 4
    done = np.asarray(zarr.open_group(str(out), mode="r")["tiles_done"][...]).astype(bool)
    assert sum(done[I, J] and done[J, I] for I, J in gram_tiles(N, TILE)) == 4  # the 5th: half written
    with pytest.raises(FileExistsError, match="--resume"):  # the CLI exits 2 with this message
        ntk.main(ARGS + ["--out", str(out)])
    resumed = run_cli(ARGS + ["--out", str(out), "--resume"], {TILE_LOG_ENV: log2})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    second = [t for _, t in read_tile_log(log2)]
    assert not (first & set(second)), "a finished tile was recomputed"
    assert sorted(first | set(second)) == gram_tiles(N, TILE) and len(second) == 11
    s = summary_of(resumed)
    assert (s["tiles_done_before"], s["tiles_computed"], s["tiles_altered"]) == (4, 11, 0)
    ref = data(one_process[0])
    assert np.abs(data(out) - ref).max() <= 1e-10 * np.abs(ref).max()


def test_cli_refusals_in_process(one_process, capsys):
    out = str(one_process[0])
    with pytest.raises(StoreMismatchError, match="chunks"):
        ntk.main(ARGS[:2] + ["--tile", "16"] + ARGS[4:] + ["--out", out, "--resume"])
    with pytest.raises(StoreMismatchError, match=r"fingerprint\['outputs'\]|shape"):
        ntk.main(ARGS + ["--out", out, "--resume", "--outputs", "3-1"])
    for bad in (["--outputs", "x"], ["--tile", "0"], ["--resume", "--overwrite"], ["--workers", "2"]):
        with pytest.raises(SystemExit):
            ntk.main(ARGS + ["--out", out] + bad)
    again = ntk.main(ARGS + ["--out", out, "--resume"])  # complete: nothing to do
    assert again["tiles_computed"] == 0 and again["tiles_done_before"] == 15
