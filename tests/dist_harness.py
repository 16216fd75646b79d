"""Run a function on N real processes joined in a gloo process group, for tests.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes, each joins a gloo group
(env:// on 127.0.0.1, a free port), calls ``fn(rank, world_size, *args)`` and sends back its
return value (any picklable value, torch tensors included). The parent returns the values in
rank order, re-raises a child's exception with its rank named, and kills every child and
fails after ``timeout`` seconds instead of hanging.

Children come from a ``forkserver`` that has imported torch once (so a run starts in a
fraction of a second instead of one torch import per process); set
``NNGEO_TEST_START_METHOD=spawn`` to use plain spawn. Either way children do not inherit the
parent's memory: ``fn`` and ``args`` must be picklable and ``fn`` a top-level function of
an importable module. With the forkserver, children see the environment variables of the
moment the forkserver started (the first run): pass per-run settings through ``args``.
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp

START_METHOD_ENV = "NNGEO_TEST_START_METHOD"
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
_GRACE_AFTER_FAILURE_S = 10.0
_PORT_RETRIES = 3


class RankError(RuntimeError):
    """A child rank raised (or died); ``rank`` and the child's ``traceback`` text attached."""

    def __init__(self, message: str, rank: int, child_traceback: str = ""):
        super().__init__(message)
        self.rank = rank
        self.child_traceback = child_traceback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_result(path: str, payload: tuple) -> None:
    """Write ``payload`` atomically (the parent only ever sees whole files)."""
    try:
        data = pickle.dumps(payload)
    except Exception as exc:  # an unpicklable return value or exception
        status, *_rest, tb = payload
        data = pickle.dumps(("error", RuntimeError(f"unpicklable {status} value: {exc!r}"), tb))
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _child(rank: int, world_size: int, port: int, timeout: float, out_dir: str,
           fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        # every rank's mesh is connected before any may finish and close its sockets (a
        # rank with no collective to run would otherwise break a peer still connecting)
        dist.barrier()
        try:
            payload: tuple = ("ok", fn(rank, world_size, *args), "")
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", exc, traceback.format_exc())
    _write_result(path, payload)


def _preload(fn: Callable) -> list[str]:
    """Modules the forkserver imports once, so that children start without importing them:
    torch, this library, and (when already imported here) pytest and ``fn``'s module.
    Only the first run's list counts (the forkserver then keeps running); modules that fail
    to import are skipped by the forkserver."""
    modules = ["torch", "torch.distributed", "nngeo_dist.dist"]
    optional = ["pytest", getattr(fn, "__module__", None)]
    return modules + [m for m in optional if m and m != "__main__" and m in sys.modules]


def _context(fn: Callable):
    method = os.environ.get(START_METHOD_ENV, "forkserver")
    if method not in mp.get_all_start_methods():
        method = "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_preload(fn))
    return ctx


def _start(ctx, world_size: int, port: int, timeout: float, out_dir: str,
           fn: Callable, args: tuple) -> list:
    saved = {k: os.environ.get(k) for k in _CHILD_ENV}
    os.environ.update({k: os.environ.get(k) or v for k, v in _CHILD_ENV.items()})
    try:
        procs = [ctx.Process(target=_child, args=(r, world_size, port, timeout, out_dir,
                                                   fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return procs


def _read(out_dir: str, rank: int):
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


def _wait(procs: list, out_dir: str, timeout: float) -> tuple[dict[int, tuple], list[int]]:
    """(results by rank, ranks still running) once every child is done, a child died, the
    timeout passed, or a grace period passed after a child reported a failure."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        # liveness first: a rank that writes its result and exits between the two reads
        # must count as finished, not as dead without a result
        alive = [p.is_alive() for p in procs]
        results = {r: res for r in range(len(procs)) if (res := _read(out_dir, r))}
        running = [r for r in range(len(procs)) if alive[r] and r not in results]
        if failed_at is None and any(res[0] == "error" for res in results.values()):
            failed_at = time.monotonic()
        dead = [r for r in range(len(procs)) if not alive[r] and r not in results]
        now = time.monotonic()
        if (len(results) == len(procs) or dead or now > deadline
                or (failed_at and now - failed_at > _GRACE_AFTER_FAILURE_S)):
            return results, running
        time.sleep(0.02)


def _raise_for(procs: list, results: dict[int, tuple], running: list[int],
               timeout: float) -> None:
    errors = {r: res for r, res in results.items() if res[0] == "error"}
    if errors:
        rank = min(errors)
        _, exc, tb = errors[rank]
        others = sorted(set(errors) - {rank})
        also = f" (ranks {others} raised too)" if others else ""
        raise RankError(f"rank {rank} raised {type(exc).__name__}: {exc}{also}\n"
                        f"--- traceback of rank {rank} ---\n{tb}", rank, tb) from exc
    dead = [r for r in range(len(procs)) if r not in results and r not in running]
    if dead:
        codes = {r: procs[r].exitcode for r in dead}
        raise RankError(f"ranks {dead} died without a result (exit codes {codes})", dead[0])
    if running:
        raise TimeoutError(f"ranks {running} did not finish within {timeout} s "
                           "(a hang: killed)")


def _port_in_use(results: dict[int, tuple]) -> bool:
    return any(res[0] == "error" and "address already in use" in str(res[1]).lower()
               for res in results.values())


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each
    computed in its own process of a gloo group of ``world_size`` ranks.

    Raises :class:`RankError` (chained to the child's exception) when a rank raises or
    dies, and ``TimeoutError`` after ``timeout`` seconds (children killed).
    """
    ctx = _context(fn)
    for attempt in range(_PORT_RETRIES):
        with tempfile.TemporaryDirectory(prefix="nngeo_ranks_") as out_dir:
            procs = _start(ctx, world_size, free_port(), timeout, out_dir, fn, args)
            try:
                results, running = _wait(procs, out_dir, timeout)
            finally:
                _kill(procs)
            if _port_in_use(results) and attempt + 1 < _PORT_RETRIES:
                continue
            _raise_for(procs, results, running, timeout)
            return [results[r][1] for r in range(world_size)]
    raise AssertionError("unreachable")
