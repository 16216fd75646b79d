"""Comparison helpers shared by the tests."""
import contextlib

import numpy as np
import pytest
import torch


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b|| (Frobenius), 0/0 read as 0."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def rel_max(a, b) -> float:
    """Relative error max|a - b| / max|b| in float64 (arrays of any kind: zarr, dask,
    numpy, torch), 0/0 read as 0."""
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype set to ``dtype`` within (nngeometry allocates in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def float64_default():
    """torch's default dtype float64 within each test of a module that imports this
    fixture (nngeometry allocates in it: its classif roots, matrices, random vectors)."""
    with default_dtype(torch.float64):
        yield


def block_mask(lc) -> torch.Tensor:
    """(d, d) True inside each layer's diagonal block (from the collection's offsets)."""
    d = lc.numel()
    m = torch.zeros(d, d, dtype=torch.bool)
    for n, l in lc.layers.items():
        s = lc.p_pos[n]
        m[s:s + l.numel(), s:s + l.numel()] = True
    return m


def run_benchmark(script: str, *args: str, timeout: float = 240):
    """Run ``benchmarks/<script> *args`` from the repository root with the package on the
    path; assert exit 0 and exactly one ``BENCH_JSON`` line. Returns (record, stdout)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    msg = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, msg
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1, msg
    return json.loads(lines[0][len("BENCH_JSON "):]), proc.stdout
