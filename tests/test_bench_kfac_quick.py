"""benchmarks/bench_kfac.py --quick runs, prints its ratios and agrees with nngeometry
(so the benchmark never rots). Timings are not asserted (DESIGN.md §5)."""
from __future__ import annotations

from checks import run_benchmark


def test_bench_kfac_quick_runs_and_prints_ratios():
    payload, out = run_benchmark("bench_kfac.py", "--quick")
    for model in ("mlp", "cnn"):
        for q in ("kfac", "ekfac", "quasidiag"):
            assert any(line.split()[:2] == [model, q] for line in out.splitlines()), out
    assert "ours/nngeo" in out and "ours/floor" in out
    assert len(payload["results"]) == 6
    for r in payload["results"]:
        assert r["ours_s"] > 0 and r["floor_s"] > 0 and r["ratio_floor"] > 0
        assert r["ratio_nngeo"] is None or r["ratio_nngeo"] > 0
    assert payload["agreement_failures"] == []
    assert len(payload["input_factor"]) == 2 and "lags/patches" in out
    assert all(r["patches_s"] > 0 and r["lags_s"] > 0 for r in payload["input_factor"])
