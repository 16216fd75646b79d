"""Benchmarks never rot: ``benchmarks/bench_core.py --quick`` runs (tiny sizes, k=1), all
three implementations agree, and the machine-readable record is well formed. Speed is
not asserted here (DESIGN.md §5)."""
from __future__ import annotations

import json

import pytest

from checks import run_benchmark


def test_bench_core_quick(tmp_path):
    pytest.importorskip("nngeometry")
    out_json = tmp_path / "bench.json"
    rec, out = run_benchmark("bench_core.py", "--quick", "--threads", "1", "--json", str(out_json))
    assert "AGREEMENT: PASS" in out, out
    assert rec == json.loads(out_json.read_text())
    assert rec["agreement"] == "PASS" and rec["threads"] == 1 and not rec["errors"]
    got = {(r["model"], r["quantity"]) for r in rec["results"]}
    assert got == {(m, q) for m in ("mlp", "cnn") for q in ("diag", "vtmv", "jacobian", "gram")}
    for r in rec["results"]:
        assert r["agree"] and set(r["time_s"]) == {"ours", "nngeo", "tfunc"}, r
        assert max(r["rel_diff"].values()) <= rec["tol"], r
        for t in r["targets"]:  # the time a target allows: bound x the peer's time, vs the floor
            peer_t = r["time_s"]["nngeo"] if t["peer"] == "nngeo" else min(
                r["time_s"]["nngeo"], r["time_s"]["tfunc"])
            assert t["allowed_s"] == pytest.approx(t["bound"] * peer_t), t
            assert t["allowed_over_floor"] == pytest.approx(t["allowed_s"] / r["floor_s"]), t
