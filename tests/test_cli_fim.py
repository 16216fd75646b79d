"""``python -m nngeo_dist.fim`` / ``torchrun -m nngeo_dist.fim``: end to end on 2 ranks (then
``load`` and an operation equal to a one-process run), a user's own model and data by
import path, and the faults (existing output, unknown names, models differing across ranks).

The torchrun runs cost seconds each (process start, torch import): there are three, plus
the launch scripts' in test_launch.py; the rest runs in this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import user_model
from nngeo_dist import FIM, load
from nngeo_dist.cli_common import _TypedCollate
from nngeo_dist.fim import cli, representations
from nngeo_dist.object import PMatDiag, PMatLowRank, PVector
from nngeo_dist.store.objects import read_attrs

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-10
USER = ["--model", "user_model:mlp", "--data", "user_model:blobs", "--no-progress"]


def subprocess_env() -> dict:
    """The environment of a launched job: this checkout and tests/ importable, one thread
    per process, no process-group variables inherited."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def torchrun(args, cwd, nproc=2, timeout=240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nngeo_dist.fim", *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def summary_of(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"expected one JSON summary line (rank 0), got: {stdout!r}"
    return json.loads(lines[0])


def error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def run_here(args, capsys) -> tuple:
    """The command line in this process (one process): (exit status, summary or None, stderr)."""
    rc = cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, (summary_of(out) if rc == 0 else None), err


def _pvec(lc, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PVector(lc, vector_repr=torch.randn(lc.numel(), dtype=torch.float64, generator=g))


# ----------------------------------------------------------------------------- 2 ranks


@pytest.mark.dist
def test_two_ranks_equal_one_process(tmp_path, capsys):
    """The embedded default (MLP trained on digits) on 2 ranks, loaded, against 1 process."""
    two = tmp_path / "two.zarr"
    proc = torchrun(["--repr", "diag", "--dtype", "float64", "--out", two, "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    s2 = summary_of(proc.stdout)
    assert s2["world_size"] == 2 and s2["n"] == 1797 and s2["representation"] == "diag"
    assert s2["bytes_reduced"] > 0 and s2["out"] == str(two)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # train the built-in model exactly as rank 0 did
    try:
        rc, s1, err = run_here(["--repr", "diag", "--dtype", "float64", "--out", tmp_path / "one.zarr",
                                "--no-progress"], capsys)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    assert s1["world_size"] == 1 and s1["bytes_reduced"] == 0
    # the same model weights on both runs (fingerprinted in the store)
    fp1, fp2 = read_attrs(tmp_path / "one.zarr")["fingerprint"], read_attrs(two)["fingerprint"]
    assert fp1 == fp2

    F1, F2 = load(str(tmp_path / "one.zarr")), load(str(two))
    assert isinstance(F2, PMatDiag) and F2.data.dtype == torch.float64
    torch.testing.assert_close(F2.data, F1.data, rtol=RTOL, atol=1e-14)
    v = _pvec(F1.layer_collection)
    torch.testing.assert_close(F2.vTMv(v), F1.vTMv(v), rtol=RTOL, atol=0)
    assert s2["trace"] == pytest.approx(s1["trace"], rel=RTOL)


@pytest.mark.dist
def test_user_model_and_data_by_import_path(tmp_path):
    """A user's factory + JSON kwargs + weights file, a user's Dataset, through
    launch/local.sh (torchrun, 2 processes); PMatLowRank is row-sharded: each rank writes
    its rows of one array."""
    width, n = 6, 37
    trained = user_model.mlp(width=width, seed=7)  # differs from the factory's seed-0 init
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "user.zarr"
    env = subprocess_env()
    env["NPROC"] = "2"
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), *USER, "--model-kwargs", json.dumps({"width": width}),
         "--weights", str(tmp_path / "w.pt"), "--data-kwargs", json.dumps({"n": n}),
         "--repr", "lowrank", "--dtype", "float64", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    s = summary_of(proc.stdout)
    assert s["world_size"] == 2 and s["n"] == n and s["representation"] == "lowrank"

    F = load(str(out), group=None)
    assert isinstance(F, PMatLowRank) and F.n == n and F.data.shape[1] == n
    model = trained.double()
    ref = FIM(model, DataLoader(user_model.blobs(n=n), batch_size=16, collate_fn=_TypedCollate(torch.float64)),
              PMatLowRank, progress=False)
    torch.testing.assert_close(F.to_torch(), ref.to_torch(), rtol=RTOL, atol=1e-14)
    v = PVector.from_model(model, F.layer_collection)
    torch.testing.assert_close(F.vTMv(v), ref.vTMv(v), rtol=RTOL, atol=0)
    assert s["trace"] == pytest.approx(float(ref.trace()), rel=RTOL)


@pytest.mark.dist
def test_models_differing_across_ranks_fail_on_every_rank(tmp_path):
    out = tmp_path / "bad.zarr"
    proc = torchrun(["--model", "user_model:mlp_seeded_by_rank", "--data", "user_model:blobs",
                     "--repr", "diag", "--out", out, "--no-progress"], tmp_path)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 2, proc.stderr[-3000:]  # one line per rank
    for line in errors:
        assert "model parameters differ between ranks 0 and 1" in line
    assert not out.exists()
    assert not proc.stdout.strip()


# ----------------------------------------------------------------------------- one process


def test_no_argument_runs_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a torchrun worker: the quickest on a small shared machine
    try:
        rc, s, err = run_here(["--no-progress"], capsys)  # the defaults, without a progress bar
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    assert s["representation"] == "kfac" and s["n"] == 1797 and s["out"] == str(tmp_path / "fim.zarr")
    F = load("fim.zarr")
    assert type(F) is representations()["kfac"]
    assert float(F.trace()) == pytest.approx(s["trace"], rel=1e-6)


def test_existing_output_resume_and_overwrite(tmp_path, capsys):
    out = tmp_path / "F.zarr"
    base = USER + ["--repr", "diag", "--dtype", "float64", "--out", out]
    rc, first, err = run_here(base, capsys)
    assert rc == 0, err
    rc, _, err = run_here(base, capsys)
    assert rc == 1
    [line] = error_lines(err)
    assert "already exists" in line and "--overwrite" in line and "--resume" in line
    rc, again, _ = run_here(base + ["--resume"], capsys)  # same computation: kept
    assert rc == 0 and again["resumed"] is True and again["trace"] == first["trace"]
    rc, _, err = run_here(USER + ["--repr", "blockdiag", "--dtype", "float64", "--out", out, "--resume"], capsys)
    assert rc == 1 and "representation" in error_lines(err)[0] and "--overwrite" in error_lines(err)[0]
    rc, _, err = run_here(base + ["--resume", "--overwrite"], capsys)
    assert rc == 1 and "exclude each other" in err
    rc, s, _ = run_here(USER + ["--repr", "blockdiag", "--dtype", "float64", "--out", out, "--overwrite"], capsys)
    assert rc == 0 and s["resumed"] is False and type(load(str(out))).__name__ == "PMatBlockDiag"


def bn_mlp() -> torch.nn.Module:
    """user_model's MLP with a BatchNorm between its layers (running statistics: buffers)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3))


def saved_blobs(path: str) -> torch.utils.data.TensorDataset:
    """A data set read from a file, as on-disk data is: same arguments, contents may change."""
    return torch.utils.data.TensorDataset(*torch.load(path))


def test_resume_refuses_a_store_of_other_buffers(tmp_path, capsys):
    """Same parameters, other BatchNorm running statistics: another FIM, not resumed."""
    model = bn_mlp()
    torch.save(model.state_dict(), tmp_path / "bn1.pt")
    model[1].running_mean.fill_(3.0)
    model[1].running_var.fill_(0.1)
    torch.save(model.state_dict(), tmp_path / "bn2.pt")
    out = tmp_path / "F.zarr"
    base = ["--model", "test_cli_fim:bn_mlp", "--data", "user_model:blobs", "--repr", "diag",
            "--dtype", "float64", "--no-progress", "--out", out]
    rc, first, err = run_here(base + ["--weights", tmp_path / "bn1.pt"], capsys)
    assert rc == 0, err
    rc, _, err = run_here(base + ["--weights", tmp_path / "bn2.pt", "--resume"], capsys)
    [line] = error_lines(err)
    assert rc == 1 and "cannot be resumed: model_state:" in line and "--overwrite" in line
    rc, again, err = run_here(base + ["--weights", tmp_path / "bn1.pt", "--resume"], capsys)
    assert rc == 0 and again["resumed"] is True and again["trace"] == first["trace"], err
    rc, other, err = run_here(base + ["--weights", tmp_path / "bn2.pt", "--overwrite"], capsys)
    assert rc == 0 and other["trace"] != pytest.approx(first["trace"], rel=1e-3), err


def test_resume_refuses_a_store_of_other_data_contents(tmp_path, capsys):
    """The data file changes (same length, same arguments): another FIM, not resumed."""
    path, out = tmp_path / "data.pt", tmp_path / "F.zarr"
    base = ["--model", "user_model:mlp", "--data", "test_cli_fim:saved_blobs", "--data-kwargs",
            json.dumps({"path": str(path)}), "--repr", "diag", "--dtype", "float64", "--no-progress",
            "--out", out]
    torch.save(user_model.blobs(n=30, seed=1)[:], path)
    rc, first, err = run_here(base, capsys)
    assert rc == 0, err
    torch.save(user_model.blobs(n=30, seed=2)[:], path)
    rc, _, err = run_here(base + ["--resume"], capsys)
    [line] = error_lines(err)
    assert rc == 1 and "cannot be resumed: data_sample:" in line and "--overwrite" in line
    rc, other, err = run_here(base + ["--overwrite"], capsys)
    assert rc == 0 and other["trace"] != pytest.approx(first["trace"], rel=1e-3), err


def test_unknown_names_list_the_valid_ones(tmp_path, capsys):
    out = tmp_path / "x.zarr"
    rc, _, err = run_here(USER + ["--repr", "nope", "--out", out], capsys)
    [line] = error_lines(err)
    assert rc == 1 and "unknown representation 'nope'" in line
    for name in representations():
        assert name in line
    rc, _, err = run_here(USER + ["--repr", "implicit", "--out", out], capsys)
    assert rc == 1 and "holds no numbers to store" in error_lines(err)[0]
    rc, _, err = run_here(USER + ["--repr", "diag", "--variant", "poisson", "--out", out], capsys)
    [line] = error_lines(err)
    assert rc == 1 and "unknown variant 'poisson'" in line and "classif_binary_logits" in line
    rc, _, err = run_here(USER + ["--repr", "diag", "--trials", "2", "--variant", "classif_binary_logits",
                                  "--out", out], capsys)
    assert rc == 1 and "regression" in error_lines(err)[0]
    rc, _, err = run_here(["--model", "no_such_module:f", "--data", "user_model:blobs", "--repr", "diag",
                           "--out", out], capsys)
    assert rc == 1 and "cannot import 'no_such_module:f'" in error_lines(err)[0]
    assert not out.exists()


def test_monte_carlo(tmp_path, capsys):
    args = USER + ["--repr", "diag", "--trials", "3", "--seed", "1", "--dtype", "float64"]
    rc, s, err = run_here(args + ["--out", tmp_path / "mc.zarr"], capsys)
    assert rc == 0 and s["trials"] == 3, err
    rc, again, err = run_here(args + ["--out", tmp_path / "mc2.zarr"], capsys)  # same seed, same draws
    assert rc == 0 and again["trace"] == s["trace"], err


def test_per_layer_mapping(tmp_path, capsys):
    if "kfac" in representations():
        rc, s, err = run_here(USER + ["--repr", "0=kfac,default=blockdiag", "--out", tmp_path / "mix.zarr"], capsys)
        assert rc == 0, err
        M = load(str(tmp_path / "mix.zarr"))
        assert [type(p).__name__ for p in M.parts] == ["PMatKFAC", "PMatBlockDiag"]
