"""benchmarks/bench_gram_bound.py: its hand-written MLP Gram is the NTK Gram (float64
oracle), and ``--quick`` runs and agrees with nngeometry (so the benchmark never rots).
Timings are not asserted (DESIGN.md §5)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import oracle
from checks import run_benchmark


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gram_bound.py"
    spec = importlib.util.spec_from_file_location("bench_gram_bound", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n", [7, 45, 90])  # one, two and three of the example row tiles
def test_hand_gram_is_the_ntk_gram(n):
    bench = _bench_module()
    torch.manual_seed(n)
    model = bench.make_mlp([6, 9, 11, 5]).double()
    x = torch.randn(n, 6, dtype=torch.float64)
    ref = oracle.gram(model, None, [(x,)])
    got = bench.hand_gram(model, x)
    assert got.shape == ref.shape == (5, n, 5, n)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


def test_bench_gram_bound_quick():
    pytest.importorskip("nngeometry")
    rec, out = run_benchmark("bench_gram_bound.py", "--quick")
    assert "AGREEMENT: PASS" in out and "1/20 of nngeometry allows" in out, out
    assert set(rec["time_s"]) == {"ours", "nngeo", "hand"} and rec["agree"]
    assert max(rec["rel_diff"].values()) <= rec["tol"]
    assert rec["allowed_s"] == pytest.approx(rec["time_s"]["nngeo"] / 20)
