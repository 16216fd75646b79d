#!/usr/bin/env python
"""Distributed speed benchmark (issue 4, "Speed"): 1 rank against 2 ranks, same total work.

On a 3-conv CNN on 3x32x32 inputs (conv 3->16->32->32, 3x3, padding 1, ReLU, 2x2 max-pool
after each, then Linear 512->10), random float32 data with a fixed seed, n examples
(``--n``, default 4000), it times

    kfac      FIM(model, loader, PMatKFAC)                 statistics -> reduce -> finalise
    diag      FIM(model, loader, PMatDiag)                 statistics -> reduce -> finalise
    vtmv      FIM(model, loader, PMatImplicit).vTMv(v)     one pass + one all_reduce

with the data sharded exactly (``nngeo_dist.dist.shard_loader``) over 1 and then 2 ranks:
processes spawned with torch.multiprocessing, joined in a gloo group on 127.0.0.1, ONE
thread each (``torch.set_num_threads(1)``), so the 2-rank run does the same work on two
cores. Each rank first warms up on a few examples (lazy imports, allocator); a timed
quantity runs between two barriers, so its time is the slowest rank's.

It prints, per quantity: the 1-rank and 2-rank times and the speedup (target >= 1.7x; also
"cpu spd", the CPU seconds of the 1-rank run over those of the busier rank of the 2-rank
run, which is what two dedicated cores would give on a machine shared with other jobs), the
bytes each rank handed to all_reduce for it and what sending every sum in full would have
cost (target for KFAC, whose factors are symmetric and travel as packed upper triangles:
<= 0.55x), and the relative difference between the 1-rank and 2-rank results (float32
sums in another order: <= 1e-4). Targets print PASS/FAIL; only ``--strict-targets`` turns
a FAIL into exit code 1 (agreement failures always do). The last line is
``BENCH_JSON {...}`` (also written to ``--json PATH``).

    PYTHONPATH=. python benchmarks/bench_dist.py [--n 4000] [--batch-size 100] [--quick]

``--quick``: n=96, batch 16, for a smoke run (timings then mean little).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta

QUANTITIES = ("kfac", "diag", "vtmv")
SPEEDUP_TARGET = 1.7
PACKED_TARGET = 0.55
AGREE_TOL = 1e-4


def make_cnn(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 10),
    )


def make_data(n: int, seed: int):
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kfac_class():
    try:
        from nngeo_dist.object import PMatKFAC
    except ImportError:
        return None
    return PMatKFAC


def worker(rank: int, world: int, port: int, args: dict, out_path: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from nngeo_dist import FIM
    from nngeo_dist.dist import bytes_naive, bytes_reduced, reset_bytes_reduced, shard_loader
    from nngeo_dist.object import PMatDiag, PMatImplicit, PVector

    torch.set_num_threads(1)
    record: dict = {"rank": rank, "results": {}, "error": None}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=args["timeout"]))
        model = make_cnn(args["seed"])
        data = make_data(args["n"], args["seed"] + 1)
        loader = shard_loader(data, batch_size=args["batch_size"])
        v = PVector.from_model(model)
        # warm-up on a few local examples: lazy imports, allocator, hooks
        few = DataLoader(Subset(data, list(loader.sampler)[: 2 * args["batch_size"]]),
                         batch_size=args["batch_size"])
        for rep in [PMatDiag] + ([_kfac_class()] if _kfac_class() else []):
            FIM(model, few, rep)
        FIM(model, few, PMatImplicit).vTMv(v)
        for q in args["quantities"]:
            if q == "kfac" and _kfac_class() is None:
                record["results"][q] = {"skipped": "PMatKFAC is not available in this tree"}
                continue
            if q == "vtmv":
                F = FIM(model, loader, PMatImplicit)  # no pass: the operator is what is timed
            dist.barrier()
            reset_bytes_reduced()
            t0, c0 = time.perf_counter(), time.process_time()
            if q == "vtmv":
                values = [float(F.vTMv(v))]
            else:
                F = FIM(model, loader, _kfac_class() if q == "kfac" else PMatDiag)
                values = None
            cpu = time.process_time() - c0
            dist.barrier()
            elapsed = time.perf_counter() - t0
            sent, naive = bytes_reduced(), bytes_naive()
            slowest = torch.tensor([cpu], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if values is None:  # summaries, outside the timing
                values = [float(F.trace()), float(F.vTMv(v))]
            record["results"][q] = {"time_s": elapsed, "cpu_s": float(slowest), "bytes_sent": sent,
                                    "bytes_full": naive, "values": values}
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        record["error"] = traceback.format_exc()
    if rank == 0 or record["error"]:
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump(record, f)


def run_world(world: int, args: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        out = os.path.join(tmp, "rank")
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, args, out)) for r in range(world)]
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        try:
            for p in procs:
                p.start()
        finally:
            for k, val in saved.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val
        deadline = time.monotonic() + args["timeout"] + 60
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        records = {}
        for r in range(world):
            if os.path.exists(f"{out}.{r}"):
                with open(f"{out}.{r}") as f:
                    records[r] = json.load(f)
    errors = {r: rec["error"] for r, rec in records.items() if rec["error"]}
    if alive:
        errors.setdefault(alive[0], f"ranks {alive} did not finish (killed)")
    if 0 not in records and not errors:
        errors[0] = "rank 0 wrote no result"
    return {"errors": errors, "results": records.get(0, {}).get("results", {})}


def _rel(a, b) -> float:
    num = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
    den = sum(y * y for y in b) ** 0.5
    return num / den if den else num


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="examples (default 4000)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="n=96, batch 16: a smoke run")
    ap.add_argument("--quantities", default=",".join(QUANTITIES),
                    help=f"comma-separated subset of {','.join(QUANTITIES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--json", default=None, help="also write the JSON record here")
    ap.add_argument("--strict-targets", action="store_true", help="exit 1 when a target fails")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.batch_size = 96, 16
    quantities = [q for q in a.quantities.split(",") if q]
    unknown = set(quantities) - set(QUANTITIES)
    if unknown:
        ap.error(f"unknown quantities {sorted(unknown)}; valid: {', '.join(QUANTITIES)}")
    args = {"n": a.n, "batch_size": a.batch_size, "seed": a.seed, "timeout": a.timeout,
            "quantities": quantities}

    print(f"bench_dist: 3-conv CNN on 3x32x32, n={a.n}, batch {a.batch_size}, float32, "
          f"1 thread per rank, gloo; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    runs = {}
    for world in (1, 2):
        t = time.perf_counter()
        runs[world] = run_world(world, args)
        print(f"  {world} rank{'s' if world > 1 else ''}: {time.perf_counter() - t:.1f} s wall "
              f"(spawn included)")
    errors = {f"{w} ranks, rank {r}": e for w, run in runs.items() for r, e in run["errors"].items()}
    for where, err in errors.items():
        print(f"ERROR ({where}):\n{err}", file=sys.stderr)

    rows, agree_all, targets_ok = [], True, True
    header = (f"{'quantity':<8} {'1 rank s':>9} {'2 ranks s':>9} {'speedup':>8} {'target':>11} "
              f"{'cpu spd':>8}  "
              f"{'sent B':>11} {'full B':>11} {'sent/full':>9} {'target':>12}  {'rel diff':>9}")
    print(header)
    print("-" * len(header))
    for q in quantities:
        r1, r2 = runs[1]["results"].get(q), runs[2]["results"].get(q)
        if r1 is None or r2 is None:
            rows.append({"quantity": q, "error": "missing"})
            print(f"{q:<8} (no result: see errors)")
            agree_all = False
            continue
        if "skipped" in r1:
            rows.append({"quantity": q, "skipped": r1["skipped"]})
            print(f"{q:<8} skipped: {r1['skipped']}")
            continue
        speedup = r1["time_s"] / r2["time_s"] if r2["time_s"] > 0 else float("inf")
        cpu_speedup = r1["cpu_s"] / r2["cpu_s"] if r2["cpu_s"] > 0 else float("inf")
        ratio = r2["bytes_sent"] / r2["bytes_full"] if r2["bytes_full"] else 1.0
        diff = _rel(r2["values"], r1["values"])
        agree = diff <= AGREE_TOL
        agree_all &= agree
        speed_ok = speedup >= SPEEDUP_TARGET
        packed_ok = ratio <= PACKED_TARGET if q == "kfac" else None
        targets_ok &= speed_ok and packed_ok is not False
        rows.append({
            "quantity": q, "time_1rank_s": r1["time_s"], "time_2ranks_s": r2["time_s"],
            "speedup": speedup, "speedup_target": SPEEDUP_TARGET, "speedup_pass": speed_ok,
            "cpu_1rank_s": r1["cpu_s"], "cpu_2ranks_s": r2["cpu_s"], "cpu_speedup": cpu_speedup,
            "bytes_sent": r2["bytes_sent"], "bytes_full": r2["bytes_full"], "sent_over_full": ratio,
            "packed_target": PACKED_TARGET if q == "kfac" else None, "packed_pass": packed_ok,
            "values_1rank": r1["values"], "values_2ranks": r2["values"], "rel_diff": diff,
            "agree": agree,
        })
        packed_txt = ("<=0.55 " + ("PASS" if packed_ok else "FAIL")) if packed_ok is not None else "(not sym.)"
        print(f"{q:<8} {r1['time_s']:>9.2f} {r2['time_s']:>9.2f} {speedup:>7.2f}x "
              f"{'>=1.7 ' + ('PASS' if speed_ok else 'FAIL'):>11} {cpu_speedup:>7.2f}x  "
              f"{r2['bytes_sent']:>11,d} "
              f"{r2['bytes_full']:>11,d} {ratio:>9.3f} {packed_txt:>12}  {diff:>9.1e}"
              f"{'' if agree else '  DISAGREE'}")
    ok = agree_all and not errors
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"speedup: wall time, 1 rank / 2 ranks (the target); cpu spd: CPU seconds of the "
          f"1-rank run / of the busier of the 2 ranks (what dedicated cores would give; "
          f"load average now {load:.1f} on {os.cpu_count()} cores)")
    print(f"AGREEMENT: {'PASS' if agree_all else 'FAIL'} (1 rank vs 2 ranks, rel <= {AGREE_TOL})")
    print(f"TARGETS: {'PASS' if targets_ok else 'FAIL'} (speedup >= {SPEEDUP_TARGET}x; KFAC "
          f"bytes <= {PACKED_TARGET}x full factors)")
    record = {"n": a.n, "batch_size": a.batch_size, "quick": a.quick, "threads_per_rank": 1,
              "cores": os.cpu_count(), "load_average": load, "results": rows, "agreement": "PASS" if agree_all else "FAIL",
              "targets": "PASS" if targets_ok else "FAIL", "errors": errors}
    line = json.dumps(record)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line)
    print("BENCH_JSON " + line)
    if not ok:
        return 1
    return 1 if (a.strict_targets and not targets_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
