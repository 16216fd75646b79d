"""benchmarks/bench_reprs.py --quick runs, times every representation's operations
against nngeometry and agrees with it (so the benchmark never rots). Timings are not
asserted (DESIGN.md §5)."""
from __future__ import annotations

import json

import pytest

from checks import run_benchmark


def test_bench_reprs_quick_runs_and_agrees(tmp_path):
    pytest.importorskip("nngeometry")
    out_json = tmp_path / "reprs.json"
    rec, out = run_benchmark("bench_reprs.py", "--quick", "--threads", "1", "--json", str(out_json))
    assert rec == json.loads(out_json.read_text())
    assert rec["benchmark"] == "bench_reprs" and rec["quick"] and rec["k"] == 1
    assert rec["agreement"] == "PASS" and "AGREEMENT: PASS" in out, out
    assert "slower than nngeometry" in out and "ours/ng" in out

    objects = rec["objects"]  # the benchmark's own list of what it times, object -> ops
    assert set(objects) >= {"dense", "blockdiag", "lowrank", "implicit", "ekfac", "gram", "pushforward", "pullback"}
    for obj in ("dense", "blockdiag", "lowrank", "implicit"):
        assert "build" in objects[obj]
    assert set(objects["dense"]) >= {"mv", "vTMv", "trace", "frobenius_norm", "get_diag", "solve", "inverse",
                                     "eigendecomposition", "to_torch"}
    expected = {(m, obj, op) for m in ("mlp", "cnn") for obj, ops in objects.items() for op in ops}
    got = {(r["model"], r["object"], r["op"]) for r in rec["results"]}
    assert got == expected
    for r in rec["results"]:
        assert r["time_s"]["ours"] > 0 and not set(r["errors"]) - {"nngeo"}, r
        if r["compared"] == "yes":  # both ran and agree
            assert r["time_s"]["nngeo"] > 0 and r["ratio_ours_nngeo"] > 0, r
            assert r["rel_diff"] is not None and r["rel_diff"] <= rec["tol"], r
        elif r["op"] == "frobenius_norm":  # against the float64 norm of our own matrix
            assert r["compared"] == "vs float64" and r["rel_diff"] <= 1e-5, r
        else:  # a documented difference, or nngeometry 0.4 raising (its FMatDense.mv ...)
            assert r["compared"].startswith("no: "), r
            assert r["compared"] != "no: nngeometry raises" or "nngeo" in r["errors"], r
        if r["floor_s"] is not None:
            assert r["floor_s"] > 0 and r["floor_counts"], r
    assert ("mlp/lowrank/solve" not in {f"{r['model']}/{r['object']}/{r['op']}" for r in rec["results"]
                                        if r["compared"] == "yes"})
    assert set(rec["slower_than_nngeometry"]) == {f"{r['model']}/{r['object']}/{r['op']}" for r in rec["results"]
                                                  if r["ratio_ours_nngeo"] is not None and r["ratio_ours_nngeo"] > 1}
