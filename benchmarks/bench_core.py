#!/usr/bin/env python
"""Core speed benchmark (issue 2, "Speed"): nngeo_dist against nngeometry 0.4 and torch.func.

From ONE run, on (a) an MLP 784-512-512-10 (ReLU) and (b) a 3-conv CNN on 3x32x32 inputs
(conv 3->16->32->32, 3x3, padding 1, ReLU, 2x2 max-pool after each, then Linear 512->10),
random float32 data with a fixed seed, it times

    diag      FIM(model, loader, PMatDiag, variant="classif_logits").get_diag()
    vtmv      FIM(model, loader, PMatImplicit).vTMv(v), v = PVector.from_model(model)
    jacobian  Jacobian(model, loader).to_torch()            (c, n, d), raw logits
    gram      GramMatrix(model, loader).to_torch()          (c, n, c, n), raw logits

for three implementations:

    ours      nngeo_dist (public API)
    nngeo     nngeometry 0.4 (same calls, its own API)
    tfunc     torch.func: vmap(jacrev(f)) over functional_call -> per-example Jacobians
              (B, c, d) batch by batch, then the quantity from them: Diag = 1/n sum
              diag(J^T H J) with H = diag(p) - p p^T; vTMv = 1/n sum (Jv)^T H (Jv);
              Gram = J J^T; Jacobian = J permuted to (c, n, d).

Timing: one warm-up call per implementation (its result is the one compared), then k rounds
(``--k``, default 3) in which the implementations run interleaved, the order rotating each
round, so that all see the same drift of a shared machine's load; the best of the k is
reported. A call whose warm-up takes longer than ``--slow-s`` seconds is not repeated (its
warm-up time is reported, marked *); one running past ``--max-call-s`` is aborted and
reported as ">T" (ratios against it are bounds, "<r" / ">r").
Numerical agreement: every pair of implementations is compared with
``max|a - b| / max|b|`` (b: the torch.func result, or nngeometry's for ours vs nngeometry);
the run fails (exit 1) when any exceeds ``--tol`` (1e-3, float32).

FLOP floors (per quantity, stated in the output): F = forward FLOPs per example from the
layer shapes (2*in*out per Linear, 2*T*Cout*Cin*k*k per conv, + bias adds); B = FLOPs of
one backward pass for activation gradients only (the same per layer, except the first
layer's input gradient, which is not needed); c_r = number of outputs back-propagated.

    diag      n*F + n*c_r*B + per layer: Linear n*c_r*out + 2*n*out*(in+1) for
              (sum_k g_k^2)^T (a^2); conv 2*n*c_r*T*Cout*(Cin*k*k+1) (per-example,
              per-output gradient, then squared: the sum over t sits inside the square).
              c_r = c - 1 (the Cholesky root of diag(p) - pp^T that nngeometry uses).
    vtmv      3*n*F (one forward + one forward-mode pass ~ 2 forwards).
    jacobian  n*F + n*c*B + per layer: Linear n*c*out*(in+1) (outer products);
              conv 2*n*c*T*Cout*(Cin*k*k+1). Also a memory floor: writing c*n*d*4 bytes at
              the copy bandwidth measured in this run; the floor is the larger of the two.
    gram      n*F + n*c*B + per layer the cheaper of
              (i)  (g g^T)*(a a^T): S(nc*T)*out + S(n*T)*(Cin*k*k+1) + S(nc)*T^2
                   (Linear: T = 1), and
              (ii) per-example gradients then J J^T: 2*n*c*T*Cout*K + S(nc)*Cout*K,
              with K = Cin*k*k+1 and S(m) = m*(m+1): a Gram is symmetric, so a product
              of m rows with themselves needs only the m(m+1)/2 pairs of the upper
              triangle (2 FLOPs each per contracted index). Nothing else about the model
              is assumed; a layer whose gradients factor can go below it (the last Linear
              of raw outputs, whose gradient is the same e_k for every example, needs no
              (g g^T) product at all).

Floor time = floor FLOPs / the float32 matmul rate measured in this run (a large square
torch.mm, same thread count; measured at the start and again at each row, the best so far
is used, since a shared machine depresses some measurements); "frac" = floor time / our
time (1.0 = at the floor). Each row also prints the 1-minute load average before/after.

Targets (issue 2): GramMatrix <= 1/20 of nngeometry on the MLP and <= 0.7 of the fastest
peer on the CNN; Implicit vTMv <= 1/4 of nngeometry on both; nothing slower than
nngeometry. Each is printed with PASS/FAIL (only ``--strict-targets`` makes a FAIL change
the exit code) and, for the bounds under 1, with the time it allows (bound * the peer's
time) as a multiple of the floor time: at or under 1x, no implementation can meet it on
this machine at the measured matmul rate.

The last line is ``BENCH_JSON {...}`` (also written to ``--json PATH``).

    PYTHONPATH=. python benchmarks/bench_core.py [--threads 2] [--k 3] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import traceback

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IMPLS = ("ours", "nngeo", "tfunc")
QUANTITIES = ("diag", "vtmv", "jacobian", "gram")


# ---------------------------------------------------------------------------------------
# models and data


def make_mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(channels, hw, n_out):
    layers, cin, s = [], 3, hw
    for cout in channels:
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin, s = cout, s // 2
    layers += [nn.Flatten(), nn.Linear(cin * s * s, n_out)]
    return nn.Sequential(*layers)


def model_specs(quick):
    if quick:
        return {
            "mlp": dict(build=lambda: make_mlp([20, 16, 16, 4]), input_shape=(20,),
                        desc="MLP 20-16-16-4"),
            "cnn": dict(build=lambda: make_cnn([4, 8, 8], 8, 4), input_shape=(3, 8, 8),
                        desc="CNN 3x8x8 conv 3-4-8-8 (+pool) -> Linear 8-4"),
        }
    return {
        "mlp": dict(build=lambda: make_mlp([784, 512, 512, 10]), input_shape=(784,),
                    desc="MLP 784-512-512-10"),
        "cnn": dict(build=lambda: make_cnn([16, 32, 32], 32, 10), input_shape=(3, 32, 32),
                    desc="CNN 3x32x32 conv 3-16-32-32 (3x3, pad 1, ReLU, maxpool 2) -> Linear 512-10"),
    }


def make_loader(x, batch_size):
    y = torch.zeros(x.shape[0], dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# ---------------------------------------------------------------------------------------
# FLOP floors


def layer_shapes(model, input_shape):
    """[(kind, Cin*k*k, Cout, T, bias)] per parametrised layer in execution order."""
    rec = []

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            rec.append(("linear", mod.in_features, mod.out_features, 1, mod.bias is not None))
        elif isinstance(mod, nn.Conv2d):
            kk = mod.kernel_size[0] * mod.kernel_size[1]
            T = out.shape[-1] * out.shape[-2]
            rec.append(("conv", mod.in_channels * kk // mod.groups, mod.out_channels, T, mod.bias is not None))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(torch.zeros((1,) + tuple(input_shape)))
    for h in hs:
        h.remove()
    return rec


def forward_flops(layers):
    return sum(2 * T * cout * K + (T * cout if b else 0) for _, K, cout, T, b in layers)


def backward_act_flops(layers):
    return sum(2 * T * cout * K for i, (_, K, cout, T, b) in enumerate(layers) if i > 0)


def sym(m):
    """FLOPs per contracted index of a product of m rows with themselves (upper triangle)."""
    return m * (m + 1)


def floor_flops(quantity, layers, n, c):
    F, B = forward_flops(layers), backward_act_flops(layers)
    if quantity == "vtmv":
        return 3 * n * F
    cr = c - 1 if quantity == "diag" else c
    total = n * F + n * cr * B
    for kind, K, cout, T, b in layers:
        Kb = K + (1 if b else 0)
        if quantity == "diag":
            if kind == "linear":  # sum_k g_k^2 first (n*cr*out), then (n, out)^T (n, in+1)
                total += n * cr * cout + 2 * n * cout * Kb
            else:  # per-example, per-output gradient (sum over t inside the square)
                total += 2 * n * cr * T * cout * Kb
        elif quantity == "jacobian":
            total += n * c * cout * Kb if kind == "linear" else 2 * n * c * T * cout * Kb
        elif quantity == "gram":
            nc = n * c
            trick = sym(nc * T) * cout + sym(n * T) * Kb + sym(nc) * T * T
            pergrad = 2 * nc * T * cout * Kb + sym(nc) * cout * Kb
            total += min(trick, pergrad)
    return total


# ---------------------------------------------------------------------------------------
# machine rates


def matmul_rate(size, k):
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b))[0] for _ in range(max(k, 3)))
    return 2 * size ** 3 / best


def copy_bandwidth(nbytes, k):
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src))[0] for _ in range(max(k, 3)))
    return 2 * src.numel() * 4 / best  # read + write


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class CallTimeout(Exception):
    """A call ran past --max-call-s; its time is only known to be larger."""


def _alarm(signum, frame):
    raise CallTimeout()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def hook_snapshot(model):
    return [(m, {a: dict(getattr(m, a)) for a in _HOOK_DICTS if hasattr(m, a)}) for m in model.modules()]


def hook_restore(snapshot):
    """Drop the hooks an aborted call left on the modules (nngeometry removes its own only
    when it finishes)."""
    for m, saved in snapshot:
        for a, d in saved.items():
            cur = getattr(m, a)
            for key in list(cur):
                if key not in d:
                    del cur[key]


def warm_up(fn, max_call_s=None):
    """The warm-up call: (time, result). Aborted (CallTimeout) past ``max_call_s`` seconds
    (SIGALRM; the implementation's Python-level loop is interrupted between torch ops)."""
    use_alarm = bool(max_call_s) and hasattr(signal, "setitimer")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max_call_s)
    try:
        t_warm, result = _timed(fn)
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return t_warm, result


# ---------------------------------------------------------------------------------------
# the three implementations


def run_ours(quantity, model, loader):
    from nngeo_dist import FIM, GramMatrix, Jacobian
    from nngeo_dist.object import PMatDiag, PMatImplicit, PVector

    if quantity == "diag":
        return lambda: FIM(model, loader, PMatDiag, variant="classif_logits").get_diag().detach()
    if quantity == "vtmv":
        v = PVector.from_model(model)
        return lambda: FIM(model, loader, PMatImplicit, variant="classif_logits").vTMv(v).detach()
    if quantity == "jacobian":
        return lambda: Jacobian(model, loader).to_torch().detach()
    if quantity == "gram":
        return lambda: GramMatrix(model, loader).to_torch().detach()
    raise ValueError(quantity)


def run_nngeo(quantity, model, loader):
    import nngeometry
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag, PMatImplicit, PVector

    if quantity == "diag":
        return lambda: FIM(model, loader, PMatDiag, variant="classif_logits").get_diag().detach()
    if quantity == "vtmv":
        v = PVector.from_model(model)
        return lambda: FIM(model, loader, PMatImplicit, variant="classif_logits").vTMv(v).detach()
    if quantity == "jacobian":
        return lambda: nngeometry.Jacobian(model, loader).to_torch().detach()
    if quantity == "gram":
        return lambda: nngeometry.GramMatrix(model, loader).to_torch().detach()
    raise ValueError(quantity)


class TorchFunc:
    """Per-example Jacobians with vmap(jacrev) over functional_call, batch by batch."""

    def __init__(self, model):
        from torch.func import functional_call, jacrev, vmap

        self.model = model
        self.params = {k: p.detach() for k, p in model.named_parameters()}
        self.names = list(self.params)
        self.sizes = [p.numel() for p in self.params.values()]
        self.d = sum(self.sizes)

        def f(params, x):
            out = functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)
            return out, out

        self.jac = vmap(jacrev(f, has_aux=True), in_dims=(None, 0))

    def batches(self, loader):
        """Yields (logits (B, c), [J_p (B, c, m_p)] in flat parameter order)."""
        for x, _ in loader:
            jd, out = self.jac(self.params, x)
            B, c = out.shape
            yield out, [jd[n].reshape(B, c, -1) for n in self.names]

    def diag(self, loader):
        acc = [torch.zeros(m) for m in self.sizes]
        n = 0
        for out, Js in self.batches(loader):
            p = torch.softmax(out, dim=1)
            for a, J in zip(acc, Js):
                a += torch.einsum("bc,bcm->m", p, J * J)
                a -= torch.einsum("bc,bcm->bm", p, J).pow_(2).sum(0)
            n += out.shape[0]
        return torch.cat(acc) / n

    def vtmv(self, loader, v):
        vs = list(torch.split(v, self.sizes))
        total, n = torch.zeros(()), 0
        for out, Js in self.batches(loader):
            p = torch.softmax(out, dim=1)
            jv = sum(torch.einsum("bcm,m->bc", J, vp) for J, vp in zip(Js, vs))
            total += (p * jv * jv).sum() - ((p * jv).sum(1) ** 2).sum()
            n += out.shape[0]
        return total / n

    def jacobian(self, loader, n, c):
        res = torch.empty(c, n, self.d)
        s = 0
        for out, Js in self.batches(loader):
            B, off = out.shape[0], 0
            for J in Js:
                m = J.shape[2]
                res[:, s:s + B, off:off + m] = J.permute(1, 0, 2)
                off += m
            s += B
        return res

    def gram(self, loader, n, c):
        per = [torch.empty(n, c, m) for m in self.sizes]
        s = 0
        for out, Js in self.batches(loader):
            B = out.shape[0]
            for P, J in zip(per, Js):
                P[s:s + B] = J
            s += B
        K = torch.zeros(n * c, n * c)
        for P in per:
            P2 = P.view(n * c, -1)
            K.addmm_(P2, P2.t())
        del per
        return K.view(n, c, n, c).permute(1, 0, 3, 2).contiguous()


def run_tfunc(quantity, model, loader, n, c):
    tf = TorchFunc(model)
    if quantity == "diag":
        return lambda: tf.diag(loader)
    if quantity == "vtmv":
        v = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return lambda: tf.vtmv(loader, v)
    if quantity == "jacobian":
        return lambda: tf.jacobian(loader, n, c)
    if quantity == "gram":
        return lambda: tf.gram(loader, n, c)
    raise ValueError(quantity)


def rel_diff(a, b):
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if a.shape != b.shape:
        return math.inf
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


# ---------------------------------------------------------------------------------------
# targets


def targets_for(model_name, quantity):
    """[(label, peer, bound)]: ours/peer <= bound; peer in {'nngeo', 'fastest'}."""
    t = [("<=1 nngeo", "nngeo", 1.0)]
    if quantity == "gram" and model_name == "mlp":
        t.append(("<=1/20 nngeo", "nngeo", 1 / 20))
    if quantity == "gram" and model_name == "cnn":
        t.append(("<=0.7 fastest peer", "fastest", 0.7))
    if quantity == "vtmv":
        t.append(("<=1/4 nngeo", "nngeo", 1 / 4))
    return t


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, k=1 (seconds)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--k", type=int, default=None, help="best of k timed calls (default 3; quick 1)")
    ap.add_argument("--n", type=int, default=None, help="examples (default 1000; quick 40)")
    ap.add_argument("--gram-n", type=int, default=None, help="examples for GramMatrix (default 200; quick 20)")
    ap.add_argument("--jac-n", type=int, default=None,
                    help="examples for Jacobian (default: n, capped so that one (c, n, d) result "
                         "fits in --jac-max-gb)")
    ap.add_argument("--jac-max-gb", type=float, default=3.0,
                    help="memory cap for one Jacobian result (default 3 GB; the MLP at n=1000 "
                         "would need 26.8 GB per copy)")
    ap.add_argument("--batch-size", type=int, default=None, help="loader batch size (default 100; quick 10)")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--quantities", default=",".join(QUANTITIES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative difference allowed")
    ap.add_argument("--slow-s", type=float, default=10.0,
                    help="a call whose warm-up exceeds this many seconds is not repeated")
    ap.add_argument("--max-call-s", type=float, default=300.0,
                    help="abort a call running past this many seconds and report '>' that time "
                         "(ratios against it become upper bounds '<'); 0 disables")
    ap.add_argument("--json", default=None, help="also write the JSON record to this path")
    ap.add_argument("--strict-targets", action="store_true", help="exit 2 when a target FAILs")
    a = ap.parse_args(argv)
    q = a.quick
    a.k = a.k if a.k is not None else (1 if q else 3)
    a.n = a.n if a.n is not None else (40 if q else 1000)
    a.gram_n = a.gram_n if a.gram_n is not None else (20 if q else 200)
    a.batch_size = a.batch_size if a.batch_size is not None else (10 if q else 100)
    a.models = [m for m in a.models.split(",") if m]
    a.quantities = [x for x in a.quantities.split(",") if x]
    a.impls = [x for x in a.impls.split(",") if x]
    return a


def library_version():
    """nngeo_dist's version, the repository commit and whether nngeo_dist/ has local edits."""
    import subprocess

    import nngeo_dist

    root = os.path.dirname(os.path.dirname(os.path.abspath(nngeo_dist.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nngeo_dist"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{nngeo_dist.__version__} @ {head or 'unknown commit'}{' +local edits' if dirty else ''}"


def _finite(o):
    """JSON-safe: NaN/Inf -> None, recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def fmt_t(t, reps):
    if t is None:
        return "     -   "
    if reps == -1:
        return f">{t:7.1f} "
    return f"{t:8.3f}{'*' if reps == 0 else ' '}"


def fmt_r(r, kind=""):
    if r is None or kind == "?":
        return "    -  "
    return f"{kind}{r:6.3f}" if kind else f"{r:7.3f}"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    specs = model_specs(args.quick)

    mm_size = 512 if args.quick else 2048
    rate = matmul_rate(mm_size, args.k)
    bw = copy_bandwidth((16 if args.quick else 512) * 2 ** 20, args.k)

    import nngeometry

    libv = library_version()  # imports nngeo_dist now: the code timed is the code named here
    print(f"# bench_core: nngeo_dist {libv}, torch {torch.__version__}, nngeometry {getattr(nngeometry, '__version__', '0.4')}, "
          f"python {platform.python_version()}, {platform.machine()}, cpus {os.cpu_count()}")
    print(f"# torch threads = {torch.get_num_threads()} (--threads {args.threads}); "
          f"k = {args.k} (best of k after 1 warm-up; * = warm-up only, > {args.slow_s:g} s); "
          f"batch size {args.batch_size}; seed {args.seed}; float32; quick={args.quick}")
    print(f"# float32 matmul rate ({mm_size}^2 mm): {rate / 1e9:.1f} GFLOP/s;  "
          f"copy bandwidth (read+write): {bw / 1e9:.1f} GB/s")
    load0 = os.getloadavg()
    print(f"# load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} cpus"
          + ("  WARNING: the machine is busy, timings are contaminated (--threads 1 is much steadier: "
             "OpenMP threads stall when a core is taken)" if load0[0] > 1.5 else ""))
    print("# rel = max|a-b|/max|b| (b = torch.func result; ours vs nngeometry: b = nngeometry); "
          f"tol {args.tol:g}")
    print("# floor: see the module docstring (vtmv = 3 forwards; diag/jacobian/gram = forward + "
          "c_r activation backwards + per-layer contraction; jacobian also bounded by writing c*n*d*4 bytes)")

    records, agree_fail, errors, target_fail = [], [], [], []
    best_rate = rate
    header = (f"{'model':5s} {'quantity':8s} {'n':>5s} | {'ours s':>9s} {'nngeo s':>9s} {'tfunc s':>9s} | "
              f"{'o/nngeo':>7s} {'o/tfunc':>7s} | {'floor GF':>9s} {'floor s':>8s} {'frac':>6s} | "
              f"{'max rel':>8s} | targets")

    for mname in args.models:
        spec = specs[mname]
        torch.manual_seed(args.seed)
        model = spec["build"]().float().eval()
        for p in model.parameters():
            p.requires_grad_(True)
        torch.manual_seed(args.seed + 1)
        X = torch.randn((args.n,) + spec["input_shape"])
        with torch.no_grad():
            c = model(X[:1]).shape[1]
        d = sum(p.numel() for p in model.parameters())
        layers = layer_shapes(model, spec["input_shape"])
        F = forward_flops(layers)
        print()
        print(f"## {mname}: {spec['desc']}; d = {d}, c = {c}, forward {F / 1e6:.3f} MFLOP/example, "
              f"activation backward {backward_act_flops(layers) / 1e6:.3f} MFLOP/example/output")
        print(header)

        for quantity in args.quantities:
            if quantity == "gram":
                n = min(args.gram_n, args.n)
            elif quantity == "jacobian":
                if args.jac_n is not None:
                    n = min(args.jac_n, args.n)
                else:
                    cap = int(args.jac_max_gb * 1e9 // (c * d * 4))
                    n = min(args.n, max(args.batch_size, cap // args.batch_size * args.batch_size))
            else:
                n = args.n
            loader = make_loader(X[:n], args.batch_size)
            times, reps, rels, errs, censored, fns = {}, {}, {}, {}, set(), {}
            load_before = os.getloadavg()[0]
            results = {}

            order = [i for i in ("tfunc", "ours", "nngeo") if i in args.impls]
            for impl in order:
                snap = hook_snapshot(model)
                try:
                    if impl == "ours":
                        fn = run_ours(quantity, model, loader)
                    elif impl == "nngeo":
                        fn = run_nngeo(quantity, model, loader)
                    else:
                        fn = run_tfunc(quantity, model, loader, n, c)
                    t, res = warm_up(fn, args.max_call_s)
                    times[impl], reps[impl] = t, 0
                    results[impl] = res
                    del res
                    if t <= args.slow_s:
                        fns[impl] = fn
                    del fn
                except CallTimeout:
                    hook_restore(snap)
                    gc.collect()
                    times[impl], reps[impl] = args.max_call_s, -1
                    censored.add(impl)
                except Exception as e:  # report and continue: the user wants the other numbers
                    hook_restore(snap)
                    errs[impl] = f"{type(e).__name__}: {e}"
                    errors.append(f"{mname}/{quantity}/{impl}: {errs[impl]}")
                    traceback.print_exc()
                # compare as soon as possible, then drop what is no longer needed
                if impl == "ours" and "ours" in results and "tfunc" in results:
                    rels["ours~tfunc"] = rel_diff(results["ours"], results["tfunc"])
                if impl == "nngeo" and "nngeo" in results:
                    if "tfunc" in results:
                        rels["nngeo~tfunc"] = rel_diff(results["nngeo"], results["tfunc"])
                    if "ours" in results:
                        rels["ours~nngeo"] = rel_diff(results["ours"], results["nngeo"])
                gc.collect()
            if "ours" in results and "nngeo" in results and "ours~nngeo" not in rels:
                rels["ours~nngeo"] = rel_diff(results["ours"], results["nngeo"])
            results.clear()
            gc.collect()
            # timed rounds, interleaved (the order rotates each round) so that every
            # implementation sees the same drift of a shared machine's load; best of k
            for rnd in range(args.k):
                live = list(fns)
                live = live[rnd % len(live):] + live[:rnd % len(live)] if live else live
                for impl in live:
                    if impl not in fns:
                        continue
                    try:
                        t, out = _timed(fns[impl])
                        del out
                        times[impl] = t if reps[impl] == 0 else min(times[impl], t)
                        reps[impl] += 1
                    except Exception as e:
                        errs[impl] = f"{type(e).__name__}: {e}"
                        errors.append(f"{mname}/{quantity}/{impl}: {errs[impl]}")
                        traceback.print_exc()
                        del fns[impl]
                    gc.collect()
            fns.clear()

            max_rel = max(rels.values()) if rels else None
            # every result that came back is compared; a call cut by --max-call-s is not
            ok = (max_rel is not None or bool(censored)) and all(
                math.isfinite(x) and x <= args.tol for x in rels.values())
            if not ok:
                agree_fail.append(f"{mname}/{quantity}: {rels}")

            to = times.get("ours")
            r_ng = to / times["nngeo"] if to is not None and "nngeo" in times else None
            r_tf = to / times["tfunc"] if to is not None and "tfunc" in times else None
            peers = [times[i] for i in ("nngeo", "tfunc") if i in times]
            r_fast = to / min(peers) if to is not None and peers else None
            # censored times (> max_call_s): a censored peer makes ours/peer an upper bound
            # ("<"), a censored ours a lower bound (">"); both censored: unknown
            bound_kind = {}
            for key, peer_set in (("nngeo", {"nngeo"}), ("tfunc", {"tfunc"}),
                                  ("fastest", {i for i in ("nngeo", "tfunc") if i in times
                                               and times[i] == (min(peers) if peers else None)})):
                pc = bool(peer_set & censored)
                oc = "ours" in censored
                bound_kind[key] = "?" if (pc and oc) else "<" if pc else ">" if oc else ""

            # the machine's rate: the best matmul rate measured so far in this run (re-measured
            # at each row: on a shared machine the rate at the start may be depressed)
            rate_row = matmul_rate(mm_size, 1)
            best_rate = max(best_rate, rate_row)
            fl = floor_flops(quantity, layers, n, c)
            floor_s = fl / best_rate
            mem_s = None
            if quantity == "jacobian":
                mem_s = c * n * d * 4 / bw
                floor_s = max(floor_s, mem_s)
            frac = floor_s / to if to and "ours" not in censored else None

            tgt_strs, tgt_recs = [], []
            for label, peer, bound in targets_for(mname, quantity):
                ratio = r_ng if peer == "nngeo" else r_fast
                bk = bound_kind[peer]
                if ratio is None or bk == "?":
                    status = "n/a"
                elif bk == "<":  # ratio is an upper bound
                    status = "PASS" if ratio <= bound else "n/a"
                elif bk == ">":  # ratio is a lower bound
                    status = "FAIL" if ratio > bound else "n/a"
                else:
                    status = "PASS" if ratio <= bound else "FAIL"
                if status == "FAIL":
                    target_fail.append(f"{mname}/{quantity}: ours/{peer} = {ratio:.3f} > {label}")
                # the time the target allows, against the floor: a bound near or under 1x
                # the floor cannot be met by any implementation on this machine
                peer_t = times.get("nngeo") if peer == "nngeo" else (min(peers) if peers else None)
                allowed = None if peer_t is None or bk == "?" else bound * peer_t
                over_floor = allowed / floor_s if allowed is not None else None
                tgt_strs.append(f"{label}: {'-' if ratio is None else f'{bk}{ratio:.3f}'} {status}"
                                + ("" if allowed is None or bound >= 1 else
                                   f" (allows {allowed:.4f} s = {over_floor:.2f}x floor)"))
                tgt_recs.append(dict(target=label, peer=peer, bound=bound, ratio=ratio, status=status,
                                     allowed_s=allowed, allowed_over_floor=over_floor))

            rel_s = ("  n/c   " if censored else "   ERR  ") if max_rel is None else f"{max_rel:8.1e}"
            if max_rel is not None and not ok:
                rel_s += " AGREEMENT FAIL"
            load_after = os.getloadavg()[0]
            print(f"{mname:5s} {quantity:8s} {n:5d} | {fmt_t(times.get('ours'), reps.get('ours'))} "
                  f"{fmt_t(times.get('nngeo'), reps.get('nngeo'))} {fmt_t(times.get('tfunc'), reps.get('tfunc'))} | "
                  f"{fmt_r(r_ng, bound_kind['nngeo'])} {fmt_r(r_tf, bound_kind['tfunc'])} | {fl / 1e9:9.3f} {floor_s:8.4f} "
                  f"{'  -   ' if frac is None else f'{frac:6.1%}'} | {rel_s} | {'; '.join(tgt_strs)}"
                  + (f" [mem floor {mem_s:.4f} s]" if mem_s is not None else "")
                  + f" [load {load_before:.1f}->{load_after:.1f}]")
            for impl, e in errs.items():
                print(f"      ERROR {impl}: {e}")
            sys.stdout.flush()
            records.append(dict(
                model=mname, quantity=quantity, n=n, c=c, d=d,
                time_s=times, timed_reps=reps, ratio_ours_nngeo=r_ng, ratio_ours_tfunc=r_tf,
                ratio_ours_fastest_peer=r_fast, floor_flops=fl, floor_s=floor_s, mem_floor_s=mem_s,
                floor_fraction=frac, rel_diff=rels, agree=ok, targets=tgt_recs, errors=errs,
                censored=sorted(censored), ratio_bounds=bound_kind, load1=[load_before, load_after],
                matmul_gflops_row=rate_row / 1e9, matmul_gflops_used=best_rate / 1e9,
            ))
        del model, X

    rate_end = matmul_rate(mm_size, args.k)
    best_rate = max(best_rate, rate_end)
    load1 = os.getloadavg()
    print(f"\n# float32 matmul rate at the end: {rate_end / 1e9:.1f} GFLOP/s (start {rate / 1e9:.1f}, "
          f"best in the run {best_rate / 1e9:.1f}: floors use the best so far at each row); "
          f"load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print()
    if agree_fail or errors:
        print("!" * 78)
        for line in errors:
            print(f"!! ERROR {line}")
        for line in agree_fail:
            print(f"!! AGREEMENT FAIL (tol {args.tol:g}) {line}")
        print("!" * 78)
    all_rel = [x for r in records for x in r["rel_diff"].values()]
    worst = max(all_rel) if all_rel else float("nan")
    agreement = "PASS" if not agree_fail and not errors and all_rel else "FAIL"
    print(f"AGREEMENT: {agreement} (max rel diff {worst:.2e} over {len(all_rel)} comparisons, tol {args.tol:g})")
    sts = [t["status"] for r in records for t in r["targets"]]
    print(f"TARGETS: {sts.count('PASS')}/{len(sts)} PASS, {sts.count('FAIL')} FAIL, {sts.count('n/a')} n/a"
          + ("" if not target_fail else "; FAIL: " + "; ".join(target_fail)))

    rec = dict(
        benchmark="bench_core", nngeo_dist=libv, quick=args.quick, threads=torch.get_num_threads(), k=args.k,
        batch_size=args.batch_size, seed=args.seed, torch=torch.__version__,
        matmul_gflops=rate / 1e9, matmul_gflops_end=rate_end / 1e9, copy_gbps=bw / 1e9, tol=args.tol,
        load_start=list(load0), load_end=list(load1), max_call_s=args.max_call_s, slow_s=args.slow_s,
        agreement=agreement, max_rel_diff=worst, targets_failed=target_fail, errors=errors,
        results=records,
    )
    line = json.dumps(_finite(rec), default=str, allow_nan=False)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print("BENCH_JSON " + line)
    if agreement != "PASS":
        return 1
    if args.strict_targets and target_fail:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
