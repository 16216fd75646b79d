"""``benchmarks/bench_dist.py --quick`` runs (1 rank and 2 spawned gloo ranks, tiny sizes),
the two runs agree, the record is well formed, and KFAC's reduction sends packed
triangles (byte counts are deterministic; speed is not asserted, DESIGN.md §5)."""
from __future__ import annotations

import json

import pytest

from checks import run_benchmark


@pytest.mark.dist
def test_bench_dist_quick(tmp_path):
    out_json = tmp_path / "bench.json"
    rec, out = run_benchmark("bench_dist.py", "--quick", "--timeout", "120", "--json", str(out_json), timeout=300)
    assert "AGREEMENT: PASS" in out, out
    assert rec == json.loads(out_json.read_text())
    assert rec["quick"] and rec["threads_per_rank"] == 1 and not rec["errors"]
    by_q = {r["quantity"]: r for r in rec["results"]}
    assert set(by_q) == {"kfac", "diag", "vtmv"}
    for q in ("diag", "vtmv"):
        r = by_q[q]
        assert r["agree"] and r["time_1rank_s"] > 0 and r["time_2ranks_s"] > 0, r
        assert r["bytes_sent"] == r["bytes_full"] > 0, r  # nothing symmetric to pack
    if "skipped" not in by_q["kfac"]:
        k = by_q["kfac"]
        assert k["agree"] and k["packed_pass"] and k["sent_over_full"] <= 0.55, k
    assert by_q["vtmv"]["bytes_sent"] <= 64  # one all_reduce of a value, a count, a flag
