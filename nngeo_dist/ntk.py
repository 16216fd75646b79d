"""``python -m nngeo_dist.ntk`` / ``torchrun -m nngeo_dist.ntk``: an NTK Gram tensor to a zarr store.

The Gram tensor K[a, i, b, j] = J_a(x_i) . J_b(x_j), shape (c, n, c, n), is computed tile
by tile (chunks (c, B, c, B), only tiles I <= J, the mirror written from the same result)
and written to ``--out``; a killed or requeued run continues with ``--resume``.

Engines: ``torchrun`` (default; the ranks of the process group share the tiles, a plain
``python -m`` run is one rank) or ``dask`` (one task per tile on dask.distributed workers:
a LocalCluster of ``--workers`` processes, or the cluster at ``--scheduler``). With no
argument: the built-in MLP on the first 512 digits, all 10 outputs, ``./gram.zarr``.
Rank 0 (the driver for dask) prints a JSON summary: n, c, tiles, bytes, seconds, trace.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from .cli_common import (
    BUILTIN_DATA,
    DTYPES,
    Timer,
    _import,
    add_common_args,
    load_data,
    load_model,
    print_summary,
    run_main,
    setup_logging,
)

log = logging.getLogger("nngeo_dist.ntk")

#: examples used by default on a built-in data set (the default run takes seconds)
DEFAULT_N_BUILTIN = 512


#: what --resume does here: the store is continued tile by tile, never recomputed whole
RESUME_HELP = (
    "continue an existing store of this same computation tile by tile: tiles already written "
    "are kept (their checksums re-checked, see --no-verify), the missing and altered ones are "
    "computed; a store of another computation (model, data, function, outputs, tile or "
    "dtype) is refused"
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nngeo_dist.ntk", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "gram.zarr", RESUME_HELP)
    p.add_argument("--tile", type=int, default=None,
                   help="tile size B in examples (chunks (c, B, c, B)); default: a (cB)^2 block of <= 8M entries")
    p.add_argument("--outputs", default="all",
                   help="output functions: 'all', a list of indices '0,3,5', or a difference 'c2-c1' (f_c2 - f_c1)")
    p.add_argument("--function", default=None,
                   help="pkg.mod:factory; factory(model) returns function(*batch) -> (batch, c) "
                        "(default: model(batch[0]))")
    # --n-examples first: under torchrun, a bare --n is refused by torchrun's own parser (an
    # ambiguous abbreviation of --nnodes / --nproc-per-node ...), --n-examples is passed on
    p.add_argument("--n-examples", "--n", dest="n", type=int, default=None,
                   help=f"use only the first n examples (default: {DEFAULT_N_BUILTIN} for a built-in "
                        "data set, all examples otherwise); write --n-examples under torchrun")
    p.add_argument("--engine", choices=("torchrun", "dask"), default="torchrun",
                   help="torchrun: the ranks of the process group (one for plain python); dask: dask workers")
    p.add_argument("--scheduler", default=None, help="dask: address of an existing scheduler (tcp://host:8786)")
    p.add_argument("--workers", type=int, default=None,
                   help="dask: LocalCluster worker processes, one thread each (default: CPU count, at most 4)")
    p.add_argument("--no-verify", action="store_true",
                   help="on --resume, do not re-check the checksums of tiles already written")
    args = p.parse_args(argv)
    if args.tile is not None and args.tile < 1:
        p.error("--tile must be a positive number of examples")
    if args.n is not None and args.n < 1:
        p.error("--n-examples must be a positive number of examples")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.engine != "dask" and (args.scheduler or args.workers):
        p.error("--scheduler and --workers are for --engine dask")
    try:
        from .store.job import parse_outputs

        args.outputs_parsed = parse_outputs(args.outputs)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    return args


def _subset(dataset, n: Optional[int], builtin: bool):
    from torch.utils.data import Subset

    total = len(dataset)
    if n is None:
        n = DEFAULT_N_BUILTIN if builtin else total
    if n > total:
        raise ValueError(f"--n-examples {n}: the data set has only {total} examples")
    return dataset if n == total else Subset(dataset, range(n))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    setup_logging(args.log_level)
    from torch.utils.data import DataLoader

    from . import GramMatrix
    from .dist.errors import collective_errors
    from .dist.fingerprint import check_same_parameters
    from .dist.group import device_for_rank, init_from_env, rank, torchrun_env_present, world_size
    from .object.stored import FMatStored

    if args.engine == "dask":
        if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
            # dask.distributed logs at INFO by default, in this process and in its workers
            os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # workers
            import distributed  # noqa: F401 - sets its loggers up on import; then quieten them

            logging.getLogger("distributed").setLevel(logging.WARNING)
        if torchrun_env_present() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--engine dask runs from one process (python -m nngeo_dist.ntk), not under torchrun")
        group = None
    else:
        group = init_from_env(timeout_s=args.timeout)
    r, w = rank(group), world_size(group)
    device = device_for_rank() if torch.cuda.is_available() and args.engine == "torchrun" else torch.device("cpu")
    dtype = DTYPES[args.dtype]

    with collective_errors(group):  # a rank that cannot load its inputs stops every rank
        model = load_model(args.model, args.model_kwargs, args.weights, device, dtype)
        dataset = _subset(load_data(args.data, args.data_kwargs, dtype), args.n, args.data in BUILTIN_DATA)
        function = _import(args.function)(model) if args.function else None
    check_same_parameters(model, group)
    loader = DataLoader(dataset, batch_size=args.batch_size)
    kw = dict(
        representation=FMatStored, group=group, store=args.out, tile=args.tile,
        resume=args.resume, overwrite=args.overwrite, engine=args.engine, dtype=args.dtype,
        outputs=args.outputs_parsed, progress=False if args.no_progress else True,
        verify_on_resume=not args.no_verify, function_id=args.function,
    )
    if args.engine == "dask":
        kw.update(scheduler=args.scheduler, workers=args.workers)
        kw.pop("group")
    with Timer() as t:
        K = GramMatrix(model, loader, function=function, **kw)
    trace = float(K.trace())
    rep = K.report
    itemsize = torch.empty((), dtype=dtype).element_size()
    summary = {
        "n": K.n, "c": K.c, "d": int(sum(p.numel() for p in model.parameters())),
        "tile": K.tile, "tiles": rep.tiles_total, "tiles_computed": rep.tiles_computed_all,
        "tiles_done_before": rep.tiles_done_before, "tiles_altered": len(rep.altered),
        "bytes": int(K.c * K.n) ** 2 * itemsize, "bytes_written": rep.bytes_written_all,
        "seconds": round(t.seconds, 4), "trace": trace, "engine": args.engine,
        "world_size": w, "dtype": args.dtype, "outputs": args.outputs, "out": os.path.abspath(args.out),
    }
    if args.engine == "dask":
        summary["scheduler"] = args.scheduler or "LocalCluster"
    print_summary(summary, r)
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main, error_status=2))
