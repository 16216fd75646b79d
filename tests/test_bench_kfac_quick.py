"""benchmarks/bench_kfac.py --quick runs, prints its ratios and agrees with nngeometry
(so the benchmark never rots). Timings are not asserted (DESIGN.md §5)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kfac_quick_runs_and_prints_ratios():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kfac.py"), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for model in ("mlp", "cnn"):
        for q in ("kfac", "ekfac", "quasidiag"):
            assert any(line.split()[:2] == [model, q] for line in out.splitlines()), out
    assert "ours/nngeo" in out and "ours/floor" in out
    payload = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])
    assert len(payload["results"]) == 6
    for r in payload["results"]:
        assert r["ours_s"] > 0 and r["floor_s"] > 0 and r["ratio_floor"] > 0
        assert r["ratio_nngeo"] is None or r["ratio_nngeo"] > 0
    assert payload["agreement_failures"] == []
