"""Benchmarks never rot: ``benchmarks/bench_core.py --quick`` runs (tiny sizes, k=1), all
three implementations agree, and the machine-readable record is well formed. Speed is
not asserted here (DESIGN.md §5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_core_quick(tmp_path):
    pytest.importorskip("nngeometry")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--quick", "--threads", "1",
         "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    msg = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, msg
    assert "AGREEMENT: PASS" in proc.stdout, msg
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1, msg
    rec = json.loads(lines[0][len("BENCH_JSON "):])
    assert rec == json.loads(out_json.read_text())
    assert rec["agreement"] == "PASS" and rec["threads"] == 1 and not rec["errors"]
    got = {(r["model"], r["quantity"]) for r in rec["results"]}
    assert got == {(m, q) for m in ("mlp", "cnn") for q in ("diag", "vtmv", "jacobian", "gram")}
    for r in rec["results"]:
        assert r["agree"] and set(r["time_s"]) == {"ours", "nngeo", "tfunc"}, r
        assert max(r["rel_diff"].values()) <= rec["tol"], r
