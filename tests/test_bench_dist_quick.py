"""``benchmarks/bench_dist.py --quick`` runs (1 rank and 2 spawned gloo ranks, tiny sizes),
the two runs agree, the record is well formed, and KFAC's reduction sends packed
triangles (byte counts are deterministic; speed is not asserted, DESIGN.md §5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
def test_bench_dist_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dist.py"), "--quick", "--timeout", "120",
         "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    msg = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, msg
    assert "AGREEMENT: PASS" in proc.stdout, msg
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1, msg
    rec = json.loads(lines[0][len("BENCH_JSON "):])
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
