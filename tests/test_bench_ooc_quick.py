"""``benchmarks/bench_ooc.py --quick`` runs (tiny sizes, in process) and its record is well
formed. Speed is not asserted here (DESIGN.md §5)."""
from __future__ import annotations

import json

from checks import run_benchmark


def test_bench_ooc_quick(tmp_path):
    out_json = tmp_path / "bench.json"
    rec, _ = run_benchmark("bench_ooc.py", "--quick", "--threads", "1", "--json", str(out_json),
                           "--store-dir", str(tmp_path / "stores"))
    assert rec == json.loads(out_json.read_text())
    assert not rec["errors"] and rec["quick"]
    s, small = rec["store"], rec["store_small"]
    assert (s["n"], s["tiles"], s["c"]) == (600, 21, 1) and (small["n"], small["tiles"]) == (300, 6)
    assert s["bytes_written"] == 600 * 600 * 4 and all(0 < x < 10 for x in s["peak_rss_gb"])
    assert s["tiles_per_s"] > 0 and s["mb_per_s"] > 0 and rec["inmem"]["seconds"] > 0
    assert rec["per_tile_ratio"] > 0 and rec["per_tile_ratio_vs_best"] > 0 and rec["scaling"] > 0 and rec["scaling_tiles"] == 3.5
    assert set(rec["targets"]) >= {"per-tile ratio <= 1.3", "scaling near n^2 (within 25%)"}
