#!/usr/bin/env python
"""Representations and their operations: nngeo_dist against nngeometry 0.4.

bench_core times FIM Diag, Implicit vTMv, Jacobian and Gram builds; bench_kfac the KFAC,
EKFAC and QuasiDiag builds. This one times what neither does: building PMatDense,
PMatBlockDiag, PMatLowRank and PMatImplicit, and on every built object the operations
both libraries have (mv, vTMv, trace, frobenius_norm, get_diag, to_torch, solve with
regul 1e-3, inverse, eigendecomposition), for PMatDense, PMatBlockDiag, PMatLowRank,
PMatImplicit, PMatKFAC, PMatEKFAC (diagonal refitted by update_diag), PMatDiag,
PMatQuasiDiag, FMatDense (GramMatrix, on --gram-n examples) and PushForwardDense /
PullBackDense (Jacobian: jvp / vjp). Objects whose build another benchmark times are
built untimed. An operation nngeometry lacks is not timed; one it has but that raises
(e.g. FMatDense.mv and .trace on its 4-d tensor, PMatEKFAC.get_diag) is timed for ours
and reported with nngeometry's error.

Models (so that a d x d matrix and its O(d^3) operations fit a 2-core run): an MLP
64-48-48-10 (d = 5962) and a CNN 3x16x16, conv 3->8->16 (3x3, pad 1, ReLU, 2x2
max-pool) -> Linear 256->10 (d = 3962); random float32 data with a fixed seed, 1000
examples in batches of 100, variant classif_logits (c = 10, m = (c-1) n rows of the
FIM's square root). ``--quick``: tiny models, 40 examples, k = 1.

Timing: for each row, one warm-up call per library (its result is the one compared, and
its time is printed as "first": it includes what a library caches, e.g. our PMatLowRank's
eigendecomposition before a solve, nngeometry's LDL factor of PMatDense), then k rounds
(``--k``, default 3) in which the two run interleaved, the order alternating; the best of
k is reported. A call faster than ``--min-call-s`` (20 ms) is repeated within a round
(same count for both) and its mean taken; one whose warm-up exceeds ``--slow-s`` is not repeated
(marked *).

Agreement: ``max|a - b| / max|b|`` (b: nngeometry's) on the result, the run fails (exit 1)
above ``--tol`` (1e-3): vectors and matrices compared as they are; ``inverse`` through
its mv on a random vector; eigendecompositions through their eigenvalues (sorted; KFAC:
the products of the factors' eigenvalues; PMatLowRank: our nonzero ones against
nngeometry's largest), not their eigenvectors (signs and degenerate subspaces are
arbitrary). Not compared, where README's "Coming from nngeometry 0.4" says the
definitions differ: PMatLowRank.solve (0.4 drops the part of v outside the span of J).
Frobenius norms are compared with the float64 norm of our own matrix (tolerance 1e-5):
nngeometry's float32 ``torch.norm`` is itself off by up to 1e-2 (6.8e-3 on the MLP's
PMatLowRank), which would fail the run on nngeometry's side.

Floors (stated per row; "-" where none is clear: O(d) work dominated by call overhead).
rate = a large float32 torch.mm measured in this run; bw = a large copy's bytes moved per
second (read + write). d_l = per-layer block size, (i', o) = a KFAC factor pair, m = (c-1)
n rows, N = c n (Gram), F/B = forward / activation-backward FLOPs per example (bench_core).

    bytes     mv, vTMv, frobenius_norm of a stored d x d (or J, blocks, Gram): its bytes
              read once; to_torch of a sparse-structured matrix: 4 d^2 bytes written
    Cholesky  solve d^3/3 (per block for BlockDiag), or once factored (both libraries keep
              the factor per regul) the factor's 4 d^2 bytes; inverse d^3 (factor + potri)
    eigh      4/3 d^3 (Householder tridiagonalisation alone)
    build     forward + (c-1) backwards + per-example gradients (bench_core's Jacobian
              floor with c-1 outputs) + the product: m d(d+1) (Dense, upper triangle),
              m sum_l d_l(d_l+1) (BlockDiag), or writing 4 m d bytes (LowRank)
    LowRank   frobenius/to_torch: the smaller Gram of J, min(m,d)(min+1) max(m,d);
              eigendecomposition: that + 4/3 min(m,d)^3; solve, once decomposed (both
              ours and nngeometry's can cache it; 0.4 recomputes its SVD): 8 d r bytes
    Implicit  vTMv 3 n F (forward + forward-mode); mv 3 n F + n (B + F) (+ one backward
              of a scalar); trace: bench_core's Diag floor
    KFAC      mv/vTMv/solve: sum 2 o i'(o + i') (G V A), inverse sum (i'^3 + o^3),
              eigendecomposition 4/3 sum (i'^3 + o^3); EKFAC mv/solve twice KFAC's mv
              (into the eigenbasis and back), vTMv once

The last line is ``BENCH_JSON {...}`` (also written to ``--json PATH``).

    PYTHONPATH=. python benchmarks/bench_reprs.py [--threads 2] [--k 3] [--quick]
        [--models mlp,cnn] [--objects dense,lowrank,...] [--ops mv,solve,...]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# bench_core's models, timers, rates and floors (benchmarks/ is on sys.path when a script
# there runs)
from bench_core import (
    _finite,
    _timed,
    backward_act_flops,
    copy_bandwidth,
    floor_flops,
    forward_flops,
    layer_shapes,
    library_version,
    make_cnn,
    make_loader,
    make_mlp,
    matmul_rate,
    rel_diff,
)

REGUL = 1e-3
OPS = ("build", "mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve",
       "inverse", "eigendecomposition")
#: (object, op) -> why the results are not compared (README, "Coming from nngeometry 0.4")
NOT_COMPARED = {
    ("lowrank", "solve"): "definitions differ: 0.4 drops the part of v outside the span of J",
}

#: Frobenius norms are compared with the float64 norm of our own matrix, not with
#: nngeometry's: 0.4 takes torch.norm, which sums float32 in float32 (6.8e-3 off on the
#: MLP's PMatLowRank, ~1e-3 on its PMatDense), ours sum in float64 (a few ulps)
FLOAT64_TOL = 1e-5


# ------------------------------------------------------------------------------ models


def model_specs(quick: bool) -> dict:
    """name -> (build, input shape, description)."""
    if quick:
        return {
            "mlp": (lambda: make_mlp([12, 10, 10, 4]), (12,), "MLP 12-10-10-4"),
            "cnn": (lambda: make_cnn([3, 4], 8, 4), (3, 8, 8), "CNN 3x8x8 conv 3-3-4 (+pool) -> Linear 16-4"),
        }
    return {
        "mlp": (lambda: make_mlp([64, 48, 48, 10]), (64,), "MLP 64-48-48-10"),
        "cnn": (lambda: make_cnn([8, 16], 16, 10), (3, 16, 16),
                "CNN 3x16x16 conv 3-8-16 (3x3, pad 1, ReLU, maxpool 2) -> Linear 256-10"),
    }


# ------------------------------------------------------------------------------ the two APIs


#: object name -> its class name (the same in both libraries)
REPR_CLASSES = {"dense": "PMatDense", "blockdiag": "PMatBlockDiag", "lowrank": "PMatLowRank",
                "implicit": "PMatImplicit", "kfac": "PMatKFAC", "ekfac": "PMatEKFAC",
                "diag": "PMatDiag", "quasidiag": "PMatQuasiDiag"}


class _API:
    """What both libraries spell the same: ``lib.GramMatrix``, ``lib.Jacobian``, and a
    FIM built through :meth:`_fim` (EKFAC's diagonal then refitted by ``update_diag``)."""

    def fim(self, model, loader, repr_name: str):
        F = self._fim(model, loader, REPR_CLASSES[repr_name])
        if repr_name == "ekfac":
            F.update_diag(loader)
        return F

    def gram(self, model, loader):
        return self.lib.GramMatrix(model, loader)

    def jacobian(self, model, loader):
        return self.lib.Jacobian(model, loader)


class Ours(_API):
    """nngeo_dist's public API."""

    name = "ours"

    def __init__(self):
        import nngeo_dist as lib
        from nngeo_dist import object as obj

        self.lib, self.obj = lib, obj

    def _fim(self, model, loader, cls: str):
        return self.lib.FIM(model, loader, getattr(self.obj, cls), variant="classif_logits", progress=False)

    def pvector(self, M, flat):
        return self.obj.PVector(M.layer_collection, vector_repr=flat)

    def fvector(self, u):
        return self.obj.FVector(u)

    def pullback(self, J):
        return J.transpose()

    def eig(self, M):
        return M.compute_eigendecomposition()


class NNGeo(_API):
    """nngeometry 0.4: the same calls in its own API."""

    name = "nngeo"

    def __init__(self):
        import nngeometry
        import nngeometry.metrics as nm
        import nngeometry.object as no
        from nngeometry.object.vector import FVector, PVector

        self.lib, self.nm, self.no, self.PV, self.FV = nngeometry, nm, no, PVector, FVector

    def _fim(self, model, loader, cls: str):
        return self.nm.FIM(model=model, loader=loader, representation=getattr(self.no, cls))

    def pvector(self, M, flat):
        return self.PV(layer_collection=M.generator.layer_collection, vector_repr=flat)

    def fvector(self, u):
        return self.FV(vector_repr=u)

    def pullback(self, J):
        return J  # 0.4 has no pull-back object: J.vjp

    def eig(self, M):
        M.compute_eigendecomposition()
        return M.get_eigendecomposition()


def op_call(api, kind: str, M, op: str, v, u) -> Callable:
    """() -> the result of ``op`` on ``M`` (an object of ``kind``) in ``api``'s calls; ``v``
    a flat (d,) tensor, ``u`` a (c, n) one (function space)."""
    if kind == "pushforward":
        pv = api.pvector(M, v)
        return lambda: M.jvp(pv) if api.name == "nngeo" else M.mv(pv)
    if kind == "pullback":
        fv = api.fvector(u)
        return lambda: M.vjp(fv) if api.name == "nngeo" else M.mv(fv)
    x = api.fvector(u) if kind == "gram" else api.pvector(M, v)
    calls = {
        "mv": lambda: M.mv(x),
        "vTMv": lambda: M.vTMv(x),
        "trace": lambda: M.trace(),
        "frobenius_norm": lambda: M.frobenius_norm(),
        "get_diag": lambda: M.get_diag(),
        "to_torch": lambda: M.to_torch(),
        "solve": lambda: M.solve(x, regul=REGUL),
        "inverse": lambda: M.inverse(regul=REGUL),
        "eigendecomposition": lambda: api.eig(M),
    }
    return calls[op]


def comparable(api, kind: str, op: str, result, v) -> torch.Tensor:
    """A tensor to compare across libraries: vectors and matrices as they are, an inverse
    through its mv on ``v``, an eigendecomposition through its sorted eigenvalues."""
    if op == "inverse":
        result = result.mv(api.pvector(result, v))
    if op == "eigendecomposition":
        evals = result[0]
        if isinstance(evals, dict):  # KFAC: the products of the factors' eigenvalues
            evals = torch.cat([torch.outer(lg, la).reshape(-1) for la, lg in evals.values()])
        return torch.sort(evals.detach().reshape(-1))[0]
    if hasattr(result, "to_torch") and not isinstance(result, torch.Tensor):
        result = result.to_torch()
    return torch.as_tensor(result).detach()


def agreement(kind: str, op: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|; a low-rank spectrum against nngeometry's largest (it keeps the
    zeros ours drops)."""
    if op == "eigendecomposition" and kind == "lowrank" and b.numel() > a.numel():
        b = b[b.numel() - a.numel():]
    return rel_diff(a.reshape(-1), b.reshape(-1))


# ------------------------------------------------------------------------------ floors


@dataclass
class Dims:
    """What the floors need of one model."""

    n: int
    c: int
    d: int
    blocks: list  # d_l per layer
    factors: list  # (i', o) per layer
    layers: list  # bench_core.layer_shapes
    n_gram: int
    rate: float  # FLOP/s
    bw: float  # bytes moved per second

    @property
    def m(self) -> int:
        return (self.c - 1) * self.n


def floor(kind: str, op: str, D: Dims, r: Optional[int] = None) -> tuple[Optional[float], str]:
    """(seconds, what it counts) of the least ``op`` on ``kind`` needs; (None, "") where
    none is clear."""
    fl = lambda f, what: (f / D.rate, what)  # noqa: E731
    by = lambda b, what: (b / D.bw, what)  # noqa: E731
    d, m, dl = D.d, D.m, D.blocks
    grads = floor_flops("jacobian", D.layers, D.n, D.c - 1)  # fwd + (c-1) bwd + per-example grads
    small, big = min(m, d), max(m, d)
    if kind == "dense":
        return {
            "build": fl(grads + m * d * (d + 1), "grads + m d(d+1)"),
            "mv": by(4 * d * d, "read 4d^2 B"), "vTMv": by(4 * d * d, "read 4d^2 B"),
            "frobenius_norm": by(4 * d * d, "read 4d^2 B"),
            "solve": by(4 * d * d, "cached factor: read 4d^2 B"),
            "inverse": fl(d ** 3, "d^3 (potrf+potri)"),
            "eigendecomposition": fl(4 / 3 * d ** 3, "4/3 d^3 (tridiag.)"),
        }.get(op, (None, ""))
    if kind == "blockdiag":
        sq = sum(b * b for b in dl)
        return {
            "build": fl(grads + m * sum(b * (b + 1) for b in dl), "grads + m sum d_l(d_l+1)"),
            "mv": by(4 * sq, "read 4 sum d_l^2 B"), "vTMv": by(4 * sq, "read 4 sum d_l^2 B"),
            "frobenius_norm": by(4 * sq, "read 4 sum d_l^2 B"),
            "to_torch": by(4 * d * d, "write 4d^2 B"),
            "solve": fl(sum(b ** 3 for b in dl) / 3, "sum d_l^3/3 (Cholesky)"),
            "inverse": fl(sum(b ** 3 for b in dl), "sum d_l^3"),
        }.get(op, (None, ""))
    if kind == "lowrank":
        gram = small * (small + 1) * big
        return {
            "build": max(fl(grads, "grads"), by(4 * m * d, "write 4md B")),
            "mv": by(4 * m * d, "read 4md B"), "vTMv": by(4 * m * d, "read 4md B"),
            "trace": by(4 * m * d, "read 4md B"), "get_diag": by(4 * m * d, "read 4md B"),
            "frobenius_norm": fl(gram, "min Gram of J"), "to_torch": fl(m * d * (d + 1), "m d(d+1)"),
            "solve": by(8 * d * (r or small), "cached evecs: read 8dr B"),
            "eigendecomposition": fl(gram + 4 / 3 * small ** 3, "min Gram + 4/3 min^3"),
        }.get(op, (None, ""))
    if kind == "implicit":
        F, B = forward_flops(D.layers), backward_act_flops(D.layers)
        return {
            "vTMv": fl(3 * D.n * F, "3 n F"),
            "mv": fl(3 * D.n * F + D.n * (B + F), "3nF + n(B+F)"),
            "trace": fl(floor_flops("diag", D.layers, D.n, D.c), "bench_core Diag floor"),
        }.get(op, (None, ""))
    if kind in ("kfac", "ekfac"):
        mvf = sum(2 * o * i * (o + i) for i, o in D.factors)
        cube = sum(i ** 3 + o ** 3 for i, o in D.factors)
        if kind == "kfac":
            table = {"mv": fl(mvf, "sum 2oi'(o+i')"), "vTMv": fl(mvf, "sum 2oi'(o+i')"),
                     "solve": fl(mvf, "sum 2oi'(o+i')"), "inverse": fl(cube, "sum i'^3+o^3"),
                     "eigendecomposition": fl(4 / 3 * cube, "4/3 sum i'^3+o^3")}
        else:
            table = {"mv": fl(2 * mvf, "2 sum 2oi'(o+i')"), "vTMv": fl(mvf, "sum 2oi'(o+i')"),
                     "solve": fl(2 * mvf, "2 sum 2oi'(o+i')")}
        table["to_torch"] = by(4 * d * d, "write 4d^2 B")
        return table.get(op, (None, ""))
    if kind in ("diag", "quasidiag"):
        return {"to_torch": by(4 * d * d, "write 4d^2 B")}.get(op, (None, ""))
    if kind in ("pushforward", "pullback"):
        return by(4 * D.c * D.n * d, "read 4cnd B") if op == "mv" else (None, "")
    if kind == "gram":
        N = D.c * D.n_gram
        return {"mv": by(4 * N * N, "read 4N^2 B"), "vTMv": by(4 * N * N, "read 4N^2 B"),
                "frobenius_norm": by(4 * N * N, "read 4N^2 B"),
                "eigendecomposition": fl(4 / 3 * N ** 3, "4/3 N^3")}.get(op, (None, ""))
    return None, ""


def model_dims(model, shape, n: int, n_gram: int, c: int, rate: float, bw: float) -> Dims:
    from nngeo_dist import LayerCollection

    lc = LayerCollection.from_model(model)
    blocks = [l.numel() for l in lc.layers.values()]
    layers = layer_shapes(model, shape)
    factors = [(K + bias, cout) for _, K, cout, _, bias in layers]
    return Dims(n, c, sum(blocks), blocks, factors, layers, n_gram, rate, bw)


# ------------------------------------------------------------------------------ timing


@dataclass
class Row:
    model: str
    kind: str
    op: str
    first_s: dict = field(default_factory=dict)
    time_s: dict = field(default_factory=dict)
    reps: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    rel: Optional[float] = None
    compared: str = "yes"
    floor_s: Optional[float] = None
    floor_what: str = ""

    @property
    def ratio(self) -> Optional[float]:
        t = self.time_s
        return t["ours"] / t["nngeo"] if "ours" in t and "nngeo" in t else None


#: a full garbage collection takes ~0.1 s in this process (torch, nngeometry, dask): it is
#: run before a call only when the calls take longer than this, where a collection
#: triggered inside the timed call would matter
GC_ABOVE_S = 0.05


def time_row(row: Row, fns: dict, k: int, slow_s: float, on_first: Callable, min_call_s: float = 0.02) -> None:
    """Warm-up of each of ``fns`` ({impl: () -> result}; ``on_first(impl, result)`` sees
    its result), then k interleaved rounds, best of k (a fast call repeated within a
    round, the same count for every impl, and averaged)."""
    live = {}
    for impl, fn in fns.items():
        try:
            t, out = _timed(fn)
            row.first_s[impl] = t
            on_first(impl, out)
            del out
            live[impl] = fn
        except Exception as e:  # report and continue: the other rows are still wanted
            row.errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if row.first_s.get(impl, GC_ABOVE_S) >= GC_ABOVE_S:
            gc.collect()
    if not live:
        return
    slowest = max(row.first_s[i] for i in live)
    inner = 1 if slowest >= min_call_s else min(1000, math.ceil(min_call_s / max(slowest, 1e-6)))
    for impl in live:
        row.time_s[impl], row.reps[impl] = row.first_s[impl], 0
    if slowest > slow_s:
        return
    names = list(live)
    for rnd in range(k):
        for impl in (names if rnd % 2 == 0 else names[::-1]):
            if slowest >= GC_ABOVE_S:
                gc.collect()
            t0 = time.perf_counter()
            for _ in range(inner):
                live[impl]()
            t = (time.perf_counter() - t0) / inner
            row.time_s[impl] = t if row.reps[impl] == 0 else min(row.time_s[impl], t)
            row.reps[impl] += 1


# ------------------------------------------------------------------------------ the run


#: object -> (operations timed, built by this benchmark's timed 'build' row?)
OBJECTS = {
    "dense": (OPS, True),
    "blockdiag": (("build", "mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve",
                   "inverse"), True),
    "lowrank": (("build", "mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve",
                 "eigendecomposition"), True),
    "implicit": (("build", "mv", "vTMv", "trace"), True),
    "kfac": (("mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve", "inverse",
              "eigendecomposition"), False),
    "ekfac": (("mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve", "inverse"),
              False),
    "diag": (("mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve", "inverse"), False),
    "quasidiag": (("mv", "vTMv", "trace", "frobenius_norm", "get_diag", "to_torch", "solve"), False),
    "gram": (("mv", "vTMv", "trace", "frobenius_norm", "to_torch", "eigendecomposition"), False),
    "pushforward": (("mv",), False),
    "pullback": (("mv",), False),
}


def build_call(api, kind: str, model, loaders: dict) -> Callable:
    if kind == "gram":
        return lambda: api.gram(model, loaders["gram"])
    if kind == "pushforward":
        return lambda: api.jacobian(model, loaders["main"])
    if kind == "pullback":
        return lambda: api.pullback(api.jacobian(model, loaders["main"]))
    return lambda: api.fim(model, loaders["main"], kind)


def run_object(mname: str, kind: str, model, loaders: dict, apis: dict, D: Dims, args) -> list:
    """Every row of one object: its build (timed or not), then its operations."""
    ops, timed_build = OBJECTS[kind]
    ops = [op for op in ops if op in args.ops]
    timed_build = timed_build and "build" in ops
    v = torch.randn(D.d, generator=torch.Generator().manual_seed(1))
    n_u = D.n_gram if kind == "gram" else D.n
    u = torch.randn(D.c, n_u, generator=torch.Generator().manual_seed(2))
    built, rows = {}, []
    if timed_build:
        row = Row(mname, kind, "build")
        build_results = {}

        def keep(impl, M):
            built[impl] = M
            build_results[impl] = comparable(apis[impl], kind, "vTMv", M.vTMv(apis[impl].pvector(M, v)), v)

        time_row(row, {i: build_call(a, kind, model, loaders) for i, a in apis.items()}, args.k, args.slow_s, keep,
                 args.min_call_s)
        compare(row, build_results, args.tol)
        row.floor_s, row.floor_what = floor(kind, "build", D)
        rows.append(row)
        report(row)
    else:
        for impl, api in apis.items():
            built[impl] = build_call(api, kind, model, loaders)()
    for op in ops:
        if op == "build" or not built:
            continue
        row = Row(mname, kind, op)
        results = {}
        fns = {i: op_call(apis[i], kind, M, op, v, u) for i, M in built.items()}
        time_row(row, fns, args.k, args.slow_s,
                 lambda impl, out: results.__setitem__(impl, comparable(apis[impl], kind, op, out, v)),
                 args.min_call_s)
        if (kind, op) in NOT_COMPARED:
            row.compared = "no: " + NOT_COMPARED[(kind, op)]
        elif op == "frobenius_norm" and "ours" in results:
            compare_to_float64(row, results["ours"], built["ours"])
        else:
            compare(row, results, args.tol)
        r = None
        if kind == "lowrank" and op == "solve":  # the rank of our (cached) eigendecomposition
            evals = getattr(built.get("ours"), "evals", None)
            r = None if evals is None else evals.numel()
        row.floor_s, row.floor_what = floor(kind, op, D, r)
        rows.append(row)
        report(row)
    built.clear()
    gc.collect()
    return rows


def compare(row: Row, results: dict, tol: float) -> None:
    if "ours" in results and "nngeo" in results:
        row.rel = agreement(row.kind, row.op, results["ours"], results["nngeo"])
        if not (math.isfinite(row.rel) and row.rel <= tol):
            row.compared = "FAIL"
    elif "nngeo" in row.errors:
        row.compared = "no: nngeometry raises"
    else:
        row.compared = "no: ours raises"


def compare_to_float64(row: Row, ours: torch.Tensor, M) -> None:
    """``row.rel``: our Frobenius norm against the float64 norm of our matrix ``M``."""
    dense = M.to_torch().detach().double()
    row.rel = rel_diff(ours.reshape(-1).double(), dense.norm().reshape(-1))
    row.compared = "vs float64" if row.rel <= FLOAT64_TOL else "FAIL"


HEADER = (f"{'model':5} {'object':11} {'op':18} | {'ours s':>9} {'nngeo s':>9} {'ours/ng':>8} | "
          f"{'first ours':>10} {'first ng':>9} | {'floor s':>9} {'ours/fl':>8} {'floor counts':24} | {'max rel':>8}")


def fmt(t: Optional[float], w: int = 9) -> str:
    return f"{'-':>{w}}" if t is None else f"{t:{w}.5f}"


def report(r: Row) -> None:
    ratio = r.ratio
    to = r.time_s.get("ours")
    over = to / r.floor_s if to is not None and r.floor_s else None
    star = lambda i: "*" if r.reps.get(i) == 0 and i in r.time_s else " "  # noqa: E731
    rel = f"{r.rel:8.1e}" if r.rel is not None else f"{'-':>8}"
    note = "" if r.compared == "yes" else f"  [{r.compared}]"
    print(f"{r.model:5} {r.kind:11} {r.op:18} | {fmt(to)}{star('ours')}{fmt(r.time_s.get('nngeo'))}{star('nngeo')}"
          f"{'-' if ratio is None else f'{ratio:.3f}':>7} | {fmt(r.first_s.get('ours'), 10)} "
          f"{fmt(r.first_s.get('nngeo'))} | {fmt(r.floor_s)} {'-' if over is None else f'{over:.1f}x':>8} "
          f"{r.floor_what:24} | {rel}{note}", flush=True)
    for impl, e in r.errors.items():
        print(f"      {impl} raises: {e}", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, k=1 (seconds)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--k", type=int, default=None, help="best of k timed rounds (default 3; quick 1)")
    ap.add_argument("--n", type=int, default=None, help="examples (default 1000; quick 40)")
    ap.add_argument("--gram-n", type=int, default=None, help="examples of the Gram matrix (default 200; quick 20)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 100; quick 10")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--objects", default=",".join(OBJECTS))
    ap.add_argument("--ops", default=",".join(OPS), help="operations to time (of each object's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--slow-s", type=float, default=8.0, help="a call whose warm-up exceeds this is not repeated")
    ap.add_argument("--min-call-s", type=float, default=None,
                    help="a call faster than this is repeated within a round (default 0.02; quick 0.002)")
    ap.add_argument("--far-above-floor", type=float, default=10.0,
                    help="rows whose time exceeds this multiple of their floor are listed")
    ap.add_argument("--json", default=None, help="also write the JSON record to this path")
    a = ap.parse_args(argv)
    a.k = a.k if a.k is not None else (1 if a.quick else 3)
    a.n = a.n or (40 if a.quick else 1000)
    a.min_call_s = a.min_call_s if a.min_call_s is not None else (0.002 if a.quick else 0.02)
    a.gram_n = a.gram_n or (20 if a.quick else 200)
    a.batch_size = a.batch_size or (10 if a.quick else 100)
    a.models = [m for m in a.models.split(",") if m]
    a.objects = [o for o in a.objects.split(",") if o]
    a.ops = [o for o in a.ops.split(",") if o]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rate = matmul_rate(512 if args.quick else 2048, args.k)
    bw = copy_bandwidth((16 if args.quick else 256) * 2 ** 20, args.k)
    apis = {"ours": Ours(), "nngeo": NNGeo()}
    libv = library_version()
    print(f"# bench_reprs: nngeo_dist {libv}, torch {torch.__version__}, nngeometry 0.4, python "
          f"{platform.python_version()}, {platform.machine()}, cpus {os.cpu_count()}, threads "
          f"{torch.get_num_threads()}; n={args.n}, gram n={args.gram_n}, batch {args.batch_size}, best of "
          f"k={args.k} (* = warm-up only), float32, classif_logits, regul {REGUL:g}")
    print(f"# matmul rate {rate / 1e9:.1f} GFLOP/s, copy bandwidth (read+write) {bw / 1e9:.1f} GB/s; "
          f"load average {os.getloadavg()[0]:.2f}; rel = max|ours - nngeo| / max|nngeo|, tol {args.tol:g}")
    rows = []
    for mname in args.models:
        build, shape, desc = model_specs(args.quick)[mname]
        torch.manual_seed(args.seed)
        model = build().float().eval()
        x = torch.randn((args.n,) + shape, generator=torch.Generator().manual_seed(args.seed + 1))
        loaders = {"main": make_loader(x, args.batch_size), "gram": make_loader(x[:args.gram_n], args.batch_size)}
        with torch.no_grad():
            c = model(x[:1]).shape[1]
        D = model_dims(model, shape, args.n, args.gram_n, c, rate, bw)
        print(f"\n## {mname}: {desc}; d = {D.d} (blocks {D.blocks}), c = {c}, m = {D.m}\n{HEADER}")
        for kind in args.objects:
            try:
                rows += run_object(mname, kind, model, loaders, apis, D, args)
            except Exception:  # a build that fails: report, keep the other objects
                traceback.print_exc()
                rows.append(Row(mname, kind, "build", errors={"run": traceback.format_exc(limit=1)}, compared="FAIL"))
    return finish(rows, args, libv, rate, bw)


def finish(rows: list, args, libv: str, rate: float, bw: float) -> int:
    slower = [r for r in rows if r.ratio is not None and r.ratio > 1]
    far = [r for r in rows if r.floor_s and "ours" in r.time_s and r.time_s["ours"] > args.far_above_floor * r.floor_s]
    failed = [r for r in rows if r.compared == "FAIL"]
    print("\nslower than nngeometry (ours/nngeo > 1): "
          + (", ".join(f"{r.model}/{r.kind}/{r.op} {r.ratio:.2f}" for r in slower) or "none"))
    print(f"over {args.far_above_floor:g}x the floor: "
          + (", ".join(f"{r.model}/{r.kind}/{r.op} {r.time_s['ours'] / r.floor_s:.0f}x" for r in far) or "none"))
    agree = "PASS" if not failed else "FAIL"
    worst = max((r.rel for r in rows if r.rel is not None), default=float("nan"))
    print(f"AGREEMENT: {agree} (max rel diff {worst:.2e} over {sum(r.rel is not None for r in rows)} "
          f"comparisons, tol {args.tol:g})" + ("" if not failed else ": " + ", ".join(
              f"{r.model}/{r.kind}/{r.op}" for r in failed)))
    rec = dict(
        benchmark="bench_reprs", nngeo_dist=libv, quick=args.quick, threads=torch.get_num_threads(), k=args.k,
        n=args.n, gram_n=args.gram_n, batch_size=args.batch_size, regul=REGUL, tol=args.tol,
        matmul_gflops=rate / 1e9, copy_gbps=bw / 1e9, torch=torch.__version__, agreement=agree,
        max_rel_diff=worst, objects={k: [op for op in ops if op in args.ops] for k, (ops, _) in OBJECTS.items()
                                         if k in args.objects},
        slower_than_nngeometry=[f"{r.model}/{r.kind}/{r.op}" for r in slower],
        results=[dict(model=r.model, object=r.kind, op=r.op, time_s=r.time_s, first_s=r.first_s,
                      timed_reps=r.reps, ratio_ours_nngeo=r.ratio, floor_s=r.floor_s, floor_counts=r.floor_what,
                      rel_diff=r.rel, compared=r.compared, errors=r.errors) for r in rows],
    )
    line = json.dumps(_finite(rec), default=str, allow_nan=False)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print("BENCH_JSON " + line)
    return 0 if agree == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
