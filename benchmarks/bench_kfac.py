#!/usr/bin/env python
"""KFAC / EKFAC / QuasiDiag speed benchmark (issue 3, "Speed"): nngeo_dist against
nngeometry 0.4, and against a floor measured in the same run.

Models (those of benchmarks/bench_core.py): (a) an MLP 784-512-512-10 (ReLU) and (b) a
3-conv CNN on 3x32x32 inputs (conv 3->16->32->32, 3x3, padding 1, ReLU, 2x2 max-pool after
each, then Linear 512->10); random float32 data, fixed seed, 1000 examples, batches of 100,
variant classif_logits (c = 10). Timed, for ours and nngeometry (same calls, its own API):

    kfac       FIM(model, loader, PMatKFAC)
    ekfac      F = FIM(model, loader, PMatEKFAC); F.update_diag(loader)   (two passes)
    quasidiag  FIM(model, loader, PMatQuasiDiag)

Timing: a warm-up on one batch, then k rounds (``--k``, default 3) in which ours,
nngeometry and the floor's pass each run once, the order rotating each round (all see the
same drift of a shared machine's speed); the best of the k is reported. Wall clock
(``--clock cpu``: this process's CPU time, steadier on a shared machine; use it with
``--threads 1``).
Agreement: ours and nngeometry's vTMv(v) for a random v must agree to ``--tol`` (1e-3 in
float32), else the run exits 1.

Floor (measured in this run, per quantity):

    pass       one forward and c-1 backward passes to the layers' OUTPUTS (not to the
               weights), over the same data: the least any method that needs the
               gradients w.r.t. pre-activations of a (c-1)-output FIM root must do
               (timed with each quantity, interleaved with ours and nngeometry).
    FLOPs      the products the statistics need, at the float32 matmul rate measured in
               this run (a large torch.mm, same thread count), per example and layer
               (i' = fan-in + bias, o = fan-out, T = output positions, c' = c-1):
               kfac       2 T i'^2 (A) + 2 c' T o^2 (G)
               ekfac      kfac + 2 T i'^2 + 2 c' T o^2 (projection to the eigenbasis)
                          + 2 c' T o i' (per-example gradients in it), plus the measured
                          time of the eigendecompositions of the factors
               quasidiag  2 c' o i' (Linear: diagonal and cross terms from squares) or
                          2 c' T o i' (conv: per-example gradients)
    floor      kfac, quasidiag: pass + FLOPs; ekfac: 2 passes + FLOPs + eigh.

Then KFAC's input factor of a stride-1 convolution by both of its routes (the patches'
product, or lags from the convolution's weight gradient: nngeo_dist/generator/patch_lags.py)
on the CNN's layers and two ResNet-sized ones, with each route's FLOPs.

Targets (issue 3): ours/nngeometry <= 0.6 on the CNN for KFAC and EKFAC, <= 1 on the MLP,
and ours/floor <= 1.5; each printed with PASS/FAIL (only ``--strict-targets`` makes a FAIL
change the exit code). The last line is ``BENCH_JSON {...}`` (also ``--json PATH``).

    PYTHONPATH=. python benchmarks/bench_kfac.py [--threads 2] [--k 2] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time

import torch
from torch import nn
# the core benchmark's models (benchmarks/ is on sys.path when a script there runs)
from bench_core import layer_shapes as core_layer_shapes
from bench_core import make_cnn, make_loader, make_mlp

QUANTITIES = ("kfac", "ekfac", "quasidiag")


# ------------------------------------------------------------------------------ models


def model_specs(quick):
    if quick:
        return {
            "mlp": (lambda: make_mlp([20, 16, 16, 4]), (20,), "MLP 20-16-16-4"),
            "cnn": (lambda: make_cnn([4, 8, 8], 8, 4), (3, 8, 8), "CNN 3x8x8 conv 3-4-8-8 (+pool) -> Linear 8-4"),
        }
    return {
        "mlp": (lambda: make_mlp([784, 512, 512, 10]), (784,), "MLP 784-512-512-10"),
        "cnn": (lambda: make_cnn([16, 32, 32], 32, 10), (3, 32, 32),
                "CNN 3x32x32 conv 3-16-32-32 (3x3, pad 1, ReLU, maxpool 2) -> Linear 512-10"),
    }


# ------------------------------------------------------------------------------ floors


def layer_shapes(model, input_shape):
    """[(kind, i', o, T)] per Linear/Conv2d in execution order (i' counts a bias's 1)."""
    return [(kind, K + bias, cout, T) for kind, K, cout, T, bias in core_layer_shapes(model, input_shape)]


def flops(quantity, layers, n, c):
    cr = c - 1
    total = 0
    for kind, i, o, T in layers:
        kfac = 2 * T * i * i + 2 * cr * T * o * o
        if quantity == "kfac":
            total += kfac
        elif quantity == "ekfac":
            total += 2 * kfac + 2 * cr * T * o * i
        else:
            total += 2 * cr * o * i * (T if kind == "conv" else 1)
    return n * total


def eigh_time(layers, k):
    """Measured time of eigendecompositions of SPD matrices of the factors' sizes."""
    mats = []
    for _, i, o, _ in layers:
        for s in (i, o):
            x = torch.randn(s, s + 8)
            mats.append(x @ x.t())
    for m in mats[:2]:
        torch.linalg.eigh(m)
    return min(_timed(lambda: [torch.linalg.eigh(m) for m in mats])[0] for _ in range(k))


def pass_fn(model, loader, c):
    """One forward and c-1 backward passes to the layers' outputs, over ``loader``."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def run():
        for x, _ in loader:
            outs = []
            hs = [m.register_forward_hook(lambda m, i, o: outs.append(o)) for m in mods]
            f = model(x)
            for h in hs:
                h.remove()
            for k in range(c - 1):
                torch.autograd.grad(f[:, k].sum(), outs, retain_graph=k < c - 2)

    return run


def matmul_rate(size, k):
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2 * size ** 3 / min(_timed(lambda: torch.mm(a, b))[0] for _ in range(max(k, 3)))


# ------------------------------------------------------------------------------ runs


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCK["wall"]


def _timed(fn):
    t0 = _clock()
    out = fn()
    return _clock() - t0, out


def run_ours(quantity, model, loader):
    from nngeo_dist import FIM
    from nngeo_dist.object import PMatEKFAC, PMatKFAC, PMatQuasiDiag

    cls = {"kfac": PMatKFAC, "ekfac": PMatEKFAC, "quasidiag": PMatQuasiDiag}[quantity]
    F = FIM(model, loader, cls, progress=False)
    if quantity == "ekfac":
        F.update_diag(loader)
    return F


def run_nngeo(quantity, model, loader):
    import nngeometry.metrics as nm
    import nngeometry.object as no

    cls = {"kfac": no.PMatKFAC, "ekfac": no.PMatEKFAC, "quasidiag": no.PMatQuasiDiag}[quantity]
    F = nm.FIM(model=model, loader=loader, representation=cls)
    if quantity == "ekfac":
        F.update_diag(loader)
    return F


def vtmv_ours(F, model, v):
    from nngeo_dist.object import PVector

    return float(F.vTMv(PVector(F.layer_collection, vector_repr=v)))


def vtmv_nngeo(F, v):
    from nngeometry.object import PVector

    return float(F.vTMv(PVector(layer_collection=F.generator.layer_collection, vector_repr=v)))


def interleaved(fns: dict, k: int) -> dict:
    """{name: (best of k seconds, last result)} for ``fns`` ({name: () -> result}) run in
    k rounds, the order rotating each round: on a machine whose speed drifts, every
    contender (ours, nngeometry, the floor's pass) sees the same phases."""
    names = list(fns)
    times = {n: [] for n in names}
    outs = {}
    for r in range(k):
        for n in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            t, outs[n] = _timed(fns[n])
            times[n].append(t)
    return {n: (min(times[n]), outs[n]) for n in names}


def factor_route_shapes(quick):
    """(N, C_in, size, C_out) of 3x3 'same' convolutions: the CNN's three, then two of a
    ResNet's sizes."""
    if quick:
        return [(10, 3, 8, 4), (10, 4, 4, 8)]
    return [(100, 3, 32, 16), (100, 16, 16, 32), (100, 32, 8, 32), (32, 64, 32, 64), (32, 128, 16, 128)]


def input_factor_routes(quick, k):
    """KFAC's input factor of a stride-1 convolution by its two routes, per shape: from
    the patches (their product, 2 T i'^2 FLOPs per example) and from lags (the weight
    gradient, 2 C^2 (2k-1)^2 S per example, plus the edges), interleaved, best of k."""
    from nngeo_dist.generator.layers import AffineMath, layer_math_for

    math_ = layer_math_for("Conv2d")
    rows = []
    print("\nKFAC input factor of a 3x3 'same' convolution: patches' product vs lags (best of "
          f"{max(k, 3)})")
    print(f"{'N':>4} {'C':>4} {'size':>5} {'patches ms':>11} {'lags ms':>8} {'lags/patches':>12} "
          f"{'patch GFLOP':>11} {'lag GFLOP':>9}")
    for n, c, size, o in factor_route_shapes(quick):
        mod = nn.Conv2d(c, o, 3, padding=1)
        x = torch.randn(n, c, size, size)
        routes = {"patches": lambda: AffineMath.kfac_A(math_, mod, x), "lags": lambda: math_._kfac_A_by_lags(mod, x)}
        for f in routes.values():
            f()
        t = {name: t for name, (t, _) in interleaved(routes, max(k, 3)).items()}
        i1 = 9 * c + 1
        fl_p = 2 * n * size * size * i1 * i1 / 1e9
        fl_l = 2 * n * size * size * c * c * 25 / 1e9
        print(f"{n:4d} {c:4d} {size:5d} {t['patches'] * 1e3:11.2f} {t['lags'] * 1e3:8.2f} "
              f"{t['lags'] / t['patches']:12.2f} {fl_p:11.3f} {fl_l:9.3f}")
        rows.append(dict(n=n, c=c, size=size, patches_s=t["patches"], lags_s=t["lags"]))
    return rows


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and data (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default 2; quick 1)")
    ap.add_argument("--k", type=int, default=None, help="timed runs per measurement (best of k)")
    ap.add_argument("--n", type=int, default=None, help="examples (default 1000; quick 40)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 100; quick 10")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--quantities", default=",".join(QUANTITIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                    help="wall (default) or cpu: this process's CPU time, steadier on a loaded "
                         "machine; equal to wall time only with --threads 1")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--no-nngeometry", action="store_true", help="time ours and the floor only")
    ap.add_argument("--strict-targets", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    a.k = a.k or (1 if a.quick else 3)
    a.threads = a.threads or (1 if a.quick else 2)
    a.n = a.n or (40 if a.quick else 1000)
    a.batch_size = a.batch_size or (10 if a.quick else 100)
    return a


def target_checks(model_name, q, ratio_ngeo, ratio_floor):
    out = []
    if q in ("kfac", "ekfac") and ratio_ngeo is not None:
        limit = 0.6 if model_name == "cnn" else 1.0
        out.append((f"ours/nngeo<={limit}", ratio_ngeo <= limit))
    out.append(("ours/floor<=1.5", ratio_floor <= 1.5))
    return out


def main(argv=None):
    global _clock
    args = parse_args(argv)
    _clock = CLOCK[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    have_ngeo = not args.no_nngeometry
    if have_ngeo:
        try:
            import nngeometry  # noqa: F401
        except ImportError:
            print("nngeometry is not installed: timing ours and the floor only")
            have_ngeo = False
    rate = matmul_rate(256 if args.quick else 2048, args.k)
    print(f"bench_kfac: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, float32, n={args.n}, batch {args.batch_size}, best of {args.k}, "
          f"{args.clock} clock; "
          f"matmul rate {rate / 1e9:.1f} GFLOP/s")
    results, failures, bad_agreement = [], [], []
    header = (f"{'model':5} {'quantity':10} {'ours s':>8} {'nngeo s':>8} {'ours/nngeo':>10} {'pass s':>8} "
              f"{'floor s':>8} {'ours/floor':>10}  targets")
    specs = model_specs(args.quick)
    for mname in args.models.split(","):
        build, shape, desc = specs[mname]
        torch.manual_seed(args.seed)
        model = build()
        x = torch.randn((args.n,) + shape)
        loader = make_loader(x, args.batch_size)
        warm = make_loader(x[: args.batch_size], args.batch_size)
        with torch.no_grad():
            c = model(x[:2]).shape[1]
        layers = layer_shapes(model, shape)
        pass_fn(model, warm, c)()  # sets its kernels up before the timed rounds
        t_eigh = eigh_time(layers, args.k)
        d = sum(p.numel() for p in model.parameters())
        print(f"\n{desc}: d={d}, c={c}; floor pass = 1 fwd + {c - 1} bwd to layer outputs; "
              f"eigh of the factors {t_eigh:.3f}s")
        print(header)
        v = torch.randn(d, generator=torch.Generator().manual_seed(1))
        for q in args.quantities.split(","):
            fns = {"ours": lambda: run_ours(q, model, loader), "pass": pass_fn(model, loader, c)}
            run_ours(q, model, warm)
            if have_ngeo:
                run_nngeo(q, model, warm)
                fns["nngeo"] = lambda: run_nngeo(q, model, loader)
            timed = interleaved(fns, args.k)
            (t_ours, F), t_pass_q = timed["ours"], timed["pass"][0]
            t_ngeo = ratio_ngeo = None
            if have_ngeo:
                t_ngeo, Fn = timed.pop("nngeo")
                ratio_ngeo = t_ours / t_ngeo
                a, b = vtmv_ours(F, model, v), vtmv_nngeo(Fn, v)
                diff = abs(a - b) / max(abs(b), 1e-30)
                if not diff <= args.tol:
                    bad_agreement.append((mname, q, diff))
                del Fn
            del F, timed
            floor = (2 if q == "ekfac" else 1) * t_pass_q + flops(q, layers, args.n, c) / rate + (t_eigh if q == "ekfac" else 0)
            ratio_floor = t_ours / floor
            checks = target_checks(mname, q, ratio_ngeo, ratio_floor)
            failures += [(mname, q, name) for name, ok in checks if not ok]
            tg = " ".join(f"{name}:{'PASS' if ok else 'FAIL'}" for name, ok in checks)
            ng = f"{t_ngeo:8.3f} {ratio_ngeo:10.3f}" if t_ngeo is not None else f"{'-':>8} {'-':>10}"
            print(f"{mname:5} {q:10} {t_ours:8.3f} {ng} {t_pass_q:8.3f} {floor:8.3f} {ratio_floor:10.3f}  {tg}", flush=True)
            results.append(dict(model=mname, quantity=q, ours_s=t_ours, nngeo_s=t_ngeo, ratio_nngeo=ratio_ngeo,
                                pass_s=t_pass_q, floor_s=floor, ratio_floor=ratio_floor, checks={n: ok for n, ok in checks}))
    factor_rows = input_factor_routes(args.quick, args.k)
    for m, q, diff in bad_agreement:
        print(f"DISAGREEMENT {m} {q}: vTMv relative difference {diff:.2e} > {args.tol}")
    print(f"\ntargets: {'all PASS' if not failures else 'FAIL: ' + ', '.join('/'.join(f) for f in failures)}")
    payload = dict(results=results, threads=args.threads, clock=args.clock, n=args.n, batch_size=args.batch_size,
                   matmul_gflops=rate / 1e9, quick=args.quick, torch=torch.__version__,
                   agreement_failures=[list(b) for b in bad_agreement], input_factor=factor_rows)
    line = json.dumps(payload, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line)
    print("BENCH_JSON " + line)
    if bad_agreement or (args.strict_targets and failures):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
