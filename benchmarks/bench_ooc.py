#!/usr/bin/env python
"""Out-of-core Gram benchmark (issue 5, "Speed and memory").

The NTK Gram tensor of n = 20,000 examples, c = 1 (the output selection f_1 - f_0, as in
the paper's Figure 7), on the core MLP 784-512-512-10 (ReLU), random float32 inputs with a
fixed seed: a (1, n, 1, n) float32 tensor of 1.6 GB, written tile by tile to a zarr store.
Every measurement runs in a fresh process (``--child``), so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark) is its own.

Measured and printed:

    store n        GramMatrix(..., store=path, tile=B): seconds, tiles, tiles/s, MB/s
                   written (logical bytes, both halves of the symmetric tensor), peak RSS
                   of each process (``--processes P``: P ranks under torchrun, gloo)
    store n_small  the same for n = 5,000; "scaling" = time(n) / time(n_small), to compare
                   with (n / n_small)^2 = 16 (the exact tile-count ratio T(T+1)/2 is printed
                   too: diagonal tiles are cheaper, so small T sits a little below n^2)
    in-memory      GramMatrix(...) of B examples (one tile's worth), ``--k`` timed runs before
                   and after the stores: "per-tile ratio" = (store seconds / tiles x
                   processes) / in-memory median seconds (also printed against the best run)

Targets (issue 5): peak RSS per process <= 1.5 GB; per-tile ratio <= 1.3; scaling near 16.
Each is printed with PASS/FAIL (speed is never asserted in tests, DESIGN.md §5).

    PYTHONPATH=. python benchmarks/bench_ooc.py                    # the full run
    PYTHONPATH=. python benchmarks/bench_ooc.py --n 8000 --n-small 2000   # reduced
    PYTHONPATH=. python benchmarks/bench_ooc.py --quick             # seconds (used by tests)

The last line is ``BENCH_JSON {...}`` (also written to ``--json PATH``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RSS_GB, TARGET_TILE_RATIO, TARGET_SCALING = 1.5, 1.3, 16.0


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux: ru_maxrss in KiB; macOS: bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


# ---------------------------------------------------------------------------------------
# children: one measurement per process
# ---------------------------------------------------------------------------------------
def build_problem(n: int, sizes, seed: int = 0):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, sizes[0], generator=g)
    y = torch.zeros(n, dtype=torch.long)
    return model, TensorDataset(x, y)


def measure_store(args, n: int, store: str) -> dict:
    """GramMatrix(..., store=store) of n examples in this process (a rank under torchrun)."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(args.threads)
    import nngeo_dist.store.gram  # noqa: F401 - imports (dask, zarr) out of the timing
    from nngeo_dist import GramMatrix
    from nngeo_dist.dist.group import init_from_env, rank, world_size
    from nngeo_dist.object.stored import FMatStored

    sizes = [int(s) for s in args.sizes.split("-")]
    model, dataset = build_problem(n, sizes)
    rss_setup = peak_rss_bytes()
    loader = DataLoader(dataset, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as warm:  # first-call costs (autograd, zarr) out of the timing
        wl = DataLoader(torch.utils.data.Subset(dataset, range(min(n, 8))), batch_size=4)
        GramMatrix(model, wl, representation=FMatStored, store=os.path.join(warm, "w.zarr"), tile=4,
                   outputs=args.outputs, progress=False)  # before the process group: one process
    group = init_from_env()
    t0 = time.perf_counter()
    K = GramMatrix(model, loader, representation=FMatStored, group=group, store=store,
                   tile=args.tile, outputs=args.outputs, overwrite=True, progress=args.progress,
                   verify_on_resume=False)
    seconds = time.perf_counter() - t0
    rep = K.report
    out = {"mode": "store", "n": n, "tile": K.tile, "c": K.c, "rank": rank(group),
           "world": world_size(group), "seconds": seconds, "job_seconds": rep.seconds,
           "tiles": rep.tiles_total, "tiles_here": rep.tiles_computed,
           "bytes_written": rep.bytes_written_all, "bytes_here": rep.bytes_written,
           "peak_rss": peak_rss_bytes(), "rss_after_setup": rss_setup}
    if args.check and rank(group) == 0:
        out["trace"] = float(K.trace())
    return out


def measure_inmem(args) -> dict:
    """In-memory GramMatrix of one tile's worth of examples: k timed runs after a warm-up."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(args.threads)
    from nngeo_dist import GramMatrix
    from nngeo_dist.store.job import select_outputs

    sizes = [int(s) for s in args.sizes.split("-")]
    model, dataset = build_problem(args.tile, sizes)
    loader = DataLoader(dataset, batch_size=args.batch_size)
    fn = select_outputs(lambda x, y: model(x), args.outputs)
    times = []
    for _ in range(args.k + 1):  # one warm-up
        t0 = time.perf_counter()
        G = GramMatrix(model, loader, function=fn, progress=False).to_torch()
        times.append(time.perf_counter() - t0)
        del G
    return {"mode": "inmem", "n": args.tile, "seconds": min(times[1:]), "times": times,
            "peak_rss": peak_rss_bytes()}


def child(args) -> None:
    out = measure_store(args, args.n, args.store) if args.child == "store" else measure_inmem(args)
    print("CHILD_JSON " + json.dumps(out), flush=True)


def run_child(mode: str, args, n: int, store: str, processes: int = 1) -> list[dict]:
    if args.in_process:  # --quick: no fresh process (peak RSS is then the run's so far)
        if processes > 1:
            raise ValueError("--in-process runs one process: drop --processes")
        return [measure_store(args, n, store) if mode == "store" else measure_inmem(args)]
    cmd_args = ["--child", mode, "--n-examples", str(n),  # a bare --n is refused by torchrun "--tile", str(args.tile), "--batch-size", str(args.batch_size),
                "--threads", str(args.threads), "--sizes", args.sizes, "--outputs", args.outputs,
                "--store", store, "--k", str(args.k)]
    if args.check:
        cmd_args.append("--check")
    if args.progress:
        cmd_args.append("--progress")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = str(args.threads)
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(Path(__file__).resolve())] + cmd_args
    else:
        cmd = [sys.executable, str(Path(__file__).resolve())] + cmd_args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} n={n} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(ln.split(" ", 1)[1]) for ln in proc.stdout.splitlines() if ln.startswith("CHILD_JSON ")]
    if not rows:
        raise RuntimeError(f"child {mode} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return sorted(rows, key=lambda r: r.get("rank", 0))


def store_stats(rows: list[dict], store: str) -> dict:
    r0 = rows[0]
    seconds = max(r["seconds"] for r in rows)
    tiles = r0["tiles"]
    on_disk = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()) if os.path.isdir(store) else None
    return {
        "n": r0["n"], "tile": r0["tile"], "c": r0["c"], "processes": r0["world"], "seconds": seconds,
        "tiles": tiles, "tiles_per_s": tiles / seconds, "bytes_written": r0["bytes_written"],
        "mb_per_s": r0["bytes_written"] / 1e6 / seconds, "bytes_on_disk": on_disk,
        "peak_rss_gb": [r["peak_rss"] / 1e9 for r in rows],
        "rss_after_setup_gb": [r["rss_after_setup"] / 1e9 for r in rows],
        "seconds_per_tile": seconds / tiles, "trace": r0.get("trace"),
    }


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--n", "--n-examples", dest="n", type=int, default=20000,
                   help="examples of the main run (default 20000)")
    p.add_argument("--n-small", type=int, default=5000, help="examples of the scaling run (default 5000; 0: skip)")
    p.add_argument("--tile", type=int, default=1000, help="tile size B (default 1000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per forward/backward pass (default: the tile size, so that a tile's "
                        "block is one product per layer, as in the in-memory GramMatrix of one tile)")
    p.add_argument("--sizes", default="784-512-512-10", help="MLP layer sizes (default 784-512-512-10)")
    p.add_argument("--outputs", default="1-0", help="output selection (default 1-0: f_1 - f_0, c = 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    p.add_argument("--processes", type=int, default=1, help="ranks of the main store run (torchrun, gloo)")
    p.add_argument("--k", type=int, default=5, help="timed repetitions of the in-memory reference, before and after the stores (default 5)")
    p.add_argument("--store-dir", default=None, help="where the stores go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--progress", action="store_true", help="show the tile progress bar of the children")
    p.add_argument("--check", action="store_true", help="also compute the trace of the main store")
    p.add_argument("--json", default=None, help="also write the record to this file")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per measurement")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (n=600, n_small=300, tile=100, MLP 64-32-32-10, k=1), in process: seconds")
    p.add_argument("--child", choices=("store", "inmem"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_small, args.tile, args.batch_size = 600, 300, 100, 100
        args.sizes, args.k = "64-32-32-10", 1
        args.check = args.in_process = True
    if args.batch_size is None:
        args.batch_size = args.tile
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    base = args.store_dir or tempfile.mkdtemp(prefix="bench_ooc_")
    os.makedirs(base, exist_ok=True)
    record = {"bench": "ooc", "n": args.n, "n_small": args.n_small, "tile": args.tile,
              "batch_size": args.batch_size, "sizes": args.sizes, "outputs": args.outputs,
              "threads": args.threads, "processes": args.processes, "quick": args.quick,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "errors": []}
    try:
        t0 = time.perf_counter()
        # the in-memory reference is timed before and after the stores (load drifts on shared
        # machines); the ratio uses the median of all its timed repetitions
        inmem_before = run_child("inmem", args, args.tile, "", 1)[0]
        main_store = os.path.join(base, f"gram_{args.n}.zarr")
        big = store_stats(run_child("store", args, args.n, main_store, args.processes), main_store)
        if not args.keep:
            shutil.rmtree(main_store, ignore_errors=True)
        record["store"] = big
        if args.n_small:
            small_store = os.path.join(base, f"gram_{args.n_small}.zarr")
            small = store_stats(run_child("store", args, args.n_small, small_store, args.processes), small_store)
            if not args.keep:
                shutil.rmtree(small_store, ignore_errors=True)
            record["store_small"] = small
            T, Ts = -(-args.n // args.tile), -(-args.n_small // args.tile)
            record["scaling"] = big["seconds"] / small["seconds"]
            record["scaling_n2"] = (args.n / args.n_small) ** 2
            record["scaling_tiles"] = (T * (T + 1) / 2) / (Ts * (Ts + 1) / 2)
        inmem_after = run_child("inmem", args, args.tile, "", 1)[0]
        timed = sorted(inmem_before["times"][1:] + inmem_after["times"][1:])
        inmem = {"n": args.tile, "times": timed, "seconds": statistics.median(timed), "best": timed[0],
                 "peak_rss": max(inmem_before["peak_rss"], inmem_after["peak_rss"])}
        record["inmem"] = inmem
        record["per_tile_ratio"] = big["seconds_per_tile"] * big["processes"] / inmem["seconds"]
        record["per_tile_ratio_vs_best"] = big["seconds_per_tile"] * big["processes"] / inmem["best"]
        record["wall_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - reported in the record
        record["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        if not args.keep and not args.store_dir:
            shutil.rmtree(base, ignore_errors=True)
    report(record)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    print("BENCH_JSON " + json.dumps(record), flush=True)
    return record


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(rec: dict) -> None:
    print(f"Out-of-core Gram benchmark: MLP {rec['sizes']}, outputs {rec['outputs']}, tile {rec['tile']}, "
          f"batch {rec['batch_size']}, {rec['threads']} torch threads x {rec['processes']} process(es), "
          f"{rec['machine']['cpus']} CPUs")
    for err in rec["errors"]:
        print("ERROR", err)
    targets = {}
    for key in ("store", "store_small"):
        s = rec.get(key)
        if not s:
            continue
        gb = (s["c"] * s["n"]) ** 2 * 4 / 1e9
        print(f"  store n={s['n']:>6} ({gb:.2f} GB tensor): {s['seconds']:8.1f} s, {s['tiles']} tiles, "
              f"{s['tiles_per_s']:.2f} tiles/s, {s['mb_per_s']:.0f} MB/s written, "
              f"{s['seconds_per_tile'] * 1e3:.0f} ms/tile, peak RSS "
              + ", ".join(f"{x:.2f}" for x in s["peak_rss_gb"]) + " GB"
              + (f", {s['bytes_on_disk'] / 1e9:.2f} GB on disk" if s.get("bytes_on_disk") else ""))
        targets[f"peak RSS n={s['n']} <= {TARGET_RSS_GB} GB"] = max(s["peak_rss_gb"]) <= TARGET_RSS_GB
    if "inmem" in rec:
        im = rec["inmem"]
        print(f"  in-memory GramMatrix of {im['n']} examples (one tile): median {im['seconds'] * 1e3:.0f} ms, "
              f"best {im['best'] * 1e3:.0f} ms ({len(im['times'])} runs, before and after the stores)")
        print(f"  per-tile ratio (store s/tile x processes / in-memory median): {rec['per_tile_ratio']:.2f} "
              f"(vs the best in-memory run: {rec['per_tile_ratio_vs_best']:.2f})")
        targets[f"per-tile ratio <= {TARGET_TILE_RATIO}"] = rec["per_tile_ratio"] <= TARGET_TILE_RATIO
    if "scaling" in rec:
        print(f"  scaling time(n={rec['n']}) / time(n={rec['n_small']}): {rec['scaling']:.1f} "
              f"(n^2 ratio {rec['scaling_n2']:.1f}; tile-count ratio {rec['scaling_tiles']:.1f})")
        targets["scaling near n^2 (within 25%)"] = abs(rec["scaling"] / rec["scaling_n2"] - 1) <= 0.25
    for name, ok in targets.items():
        print(f"  {_pf(ok)}  {name}")
    rec["targets"] = targets


if __name__ == "__main__":
    rec = main()
    sys.exit(1 if rec.get("errors") else 0)
