"""``python -m nngeo_dist.fim`` / ``torchrun -m nngeo_dist.fim``: a FIM to a zarr store.

With no argument: the built-in MLP on digits, KFAC, ``./fim.zarr``. Under torchrun each
rank takes its exact shard of the data set; the statistics are all-reduced, so the stored
matrix equals the one-process result (up to the rounding of a sum in another order). A
Monte-Carlo FIM (``--trials``) is the exception: each rank draws its own samples, so runs
on different numbers of ranks are statistically equivalent, not identical. Rank 0 prints
one JSON summary line; a failure prints one ``error: ...`` line (per rank) and exits with
status 1; an invalid option is refused by the argument parser with status 2.

Examples::

    python -m nngeo_dist.fim
    torchrun --standalone --nproc_per_node=4 -m nngeo_dist.fim --repr ekfac --out F.zarr
    python -m nngeo_dist.fim --model mypkg.models:resnet --model-kwargs '{"depth": 18}' \\
        --weights ckpt.pt --data mypkg.data:train_set --repr diag --dtype float64
    python -m nngeo_dist.fim --repr "Linear=kfac,default=blockdiag"     # one per layer type

Then ``nngeo_dist.load("F.zarr")`` returns the matrix.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from .cli_common import (
    BUILTIN_MODELS, DTYPES, Timer, add_common_args, load_data, load_model, positive_int,
    print_summary, run_main, setup_logging, typed_collate,
)

log = logging.getLogger("nngeo_dist.fim")

#: CLI name -> class name (only those importable are offered).
REPRESENTATION_NAMES = {
    "dense": "PMatDense", "diag": "PMatDiag", "blockdiag": "PMatBlockDiag",
    "lowrank": "PMatLowRank", "kfac": "PMatKFAC", "ekfac": "PMatEKFAC",
    "quasidiag": "PMatQuasiDiag",
}
#: Representations that hold no numbers to store (asked for by name: a specific error).
NOT_STORABLE = {"implicit": "PMatImplicit"}


def representations() -> dict:
    """CLI name -> representation class, for those this installation has."""
    from . import object as o
    from .object import pspace

    out = {}
    for k, v in REPRESENTATION_NAMES.items():
        cls = getattr(o, v, None) or getattr(pspace, v, None)
        if cls is not None:
            out[k] = cls
    return out


def resolve_representation(spec: str):
    """A class for a name (``kfac``), or a mapping for ``Linear=kfac,default=diag`` (mixed)."""
    reprs = representations()
    valid = ", ".join(reprs)
    if "=" not in spec:
        if spec in NOT_STORABLE:
            raise ValueError(
                f"representation '{spec}' ({NOT_STORABLE[spec]}) holds no numbers to store (each "
                f"operation is a pass over the data): use it from Python; valid names here: {valid}"
            )
        if spec not in reprs:
            raise ValueError(f"unknown representation '{spec}'; valid names: {valid} (or a per-layer "
                             "mapping such as 'Linear=kfac,default=blockdiag')")
        return reprs[spec]
    mapping = {}
    for item in spec.split(","):
        key, _, name = item.partition("=")
        key, name = key.strip(), name.strip()
        if not key or name not in reprs:
            raise ValueError(
                f"cannot read '{item}' of --repr '{spec}': write layer-type-or-name=representation "
                f"pairs separated by commas, representations among {valid}"
            )
        mapping[key] = reprs[name]
    return mapping


#: what --resume does here (the whole matrix is one result: kept or recomputed)
RESUME_HELP = (
    "an existing complete store of this same computation (model parameters and buffers, data "
    "length and 16 sampled examples, settings) is kept, nothing recomputed; an incomplete "
    "one is recomputed; one of another computation is refused"
)


def check_variant(variant: str, trials: Optional[int]) -> None:
    from .generator.variants import MC_VARIANTS, VARIANTS

    valid = MC_VARIANTS if trials else VARIANTS
    if variant not in valid:
        what = "Monte-Carlo variant (--trials)" if trials else "variant"
        raise ValueError(f"unknown {what} '{variant}'; valid names: {', '.join(valid)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nngeo_dist.fim",
        description="Compute a Fisher Information Matrix and write it to a zarr store "
                    "(open it again with nngeo_dist.load). With no argument: an MLP trained on "
                    "digits, KFAC, ./fim.zarr.",
        epilog="Under torchrun (torchrun --nproc_per_node=N -m nngeo_dist.fim ...) every rank "
               "takes its exact shard of the data and the result equals the one-process one (up "
               "to rounding). With --trials each rank draws its own samples of y: the same seed "
               "and number of ranks give the same result, another number of ranks a "
               "statistically equivalent, not identical, one.",
    )
    add_common_args(p, "fim.zarr", RESUME_HELP)
    p.add_argument("--repr", default="kfac",
                   help="representation: " + ", ".join(REPRESENTATION_NAMES)
                   + ", or a per-layer mapping such as 'Linear=kfac,default=blockdiag' (default: kfac)")
    p.add_argument("--variant", default="classif_logits",
                   help="classif_logits, classif_binary_logits, regression (default: classif_logits)")
    no_trials = " (leave --trials out for the closed-form FIM)"
    p.add_argument("--trials", type=positive_int("draws", no_trials), default=None,
                   help="Monte-Carlo FIM with this many draws of y ~ p(y|x) per example "
                        "(default: none, the closed-form FIM)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (default: 0)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _summary_numbers(F) -> dict:
    out = {}
    for key in ("trace", "frobenius_norm"):
        try:
            out[key] = float(getattr(F, key)())
        except NotImplementedError:
            out[key] = None
    return out


def _fingerprint(args, model_state: str, data_sample: str, n: int) -> dict:
    """What identifies the computation a store holds (``--resume`` keeps a store only when
    all of it matches). The model by its parameters and buffers (``model_state``, see
    :func:`nngeo_dist.dist.fingerprint.check_same_model`: BatchNorm statistics change the
    FIM), the data by its length and a hash of 16 examples spread over it (``data_sample``,
    see :func:`nngeo_dist.store.job.data_fingerprint`): a change to other examples alone
    is not seen, as for the NTK stores."""
    return {
        "model": args.model, "model_kwargs": _canonical(args.model_kwargs),
        "model_state": model_state, "data": args.data,
        "data_kwargs": _canonical(args.data_kwargs), "data_sample": data_sample, "n": n,
        "representation": args.repr,
        "variant": args.variant, "trials": args.trials, "seed": args.seed if args.trials else None,
        "dtype": args.dtype,
    }


def _canonical(kwargs_json: str) -> str:
    return json.dumps(json.loads(kwargs_json or "{}"), sort_keys=True)


def _sync_builtin(model, group) -> None:
    """Built-in models are trained in-process: take rank 0's weights everywhere (training
    on different hardware may round differently). User models are checked, not synced."""
    from .dist.group import world_size
    from .dist.reduce import broadcast_object

    if group is None or world_size(group) == 1:
        return
    state = broadcast_object({k: v.cpu() for k, v in model.state_dict().items()}, 0, group)
    model.load_state_dict(state)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the command line; returns the summary (also printed, as JSON, by rank 0)."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: choose one")
    representation = resolve_representation(args.repr)
    check_variant(args.variant, args.trials)

    from . import FIM, FIM_MonteCarlo
    from .dist.errors import collective_errors
    from .dist.fingerprint import check_same_model
    from .dist.group import device_for_rank, init_from_env, rank, world_size
    from .dist.reduce import bytes_reduced, reset_bytes_reduced
    from .dist.sharding import shard_loader
    from .store.job import data_fingerprint
    from .store.objects import check_output_path, load, save

    group = init_from_env(timeout_s=args.timeout)
    r, w = rank(group), world_size(group)
    device = device_for_rank() if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    status = check_output_path(args.out, overwrite=args.overwrite, resume=args.resume, group=group)

    with collective_errors(group):  # a rank that cannot build the model stops every rank
        model = load_model(args.model, args.model_kwargs, args.weights, device, dtype)
        dataset = load_data(args.data, args.data_kwargs, dtype)
        data_sample = data_fingerprint(dataset)  # reads examples: may fail on one rank
    if args.model in BUILTIN_MODELS and not args.weights:
        _sync_builtin(model, group)
    model_state = check_same_model(model, group)  # the helpers need not check it again
    # before the resume check, so that data of different lengths on the ranks is refused
    # even when rank 0 finds a finished store
    loader = shard_loader(dataset, group=group, batch_size=args.batch_size, collate_fn=typed_collate(dtype))
    n = len(dataset)
    fingerprint = _fingerprint(args, model_state, data_sample, n)
    if status in ("done", "resume"):
        status = check_output_path(args.out, overwrite=False, resume=True, group=group, fingerprint=fingerprint)

    summary = {
        "representation": args.repr, "variant": args.variant, "trials": args.trials,
        "dtype": args.dtype, "n": n, "world_size": w, "out": os.path.abspath(args.out),
    }
    if status == "done":
        log.info("%s already holds this computation (--resume): nothing to compute", args.out)
        F = load(args.out, group=group, device=device)
        summary.update(seconds=0.0, bytes_reduced=0, resumed=True)
    else:
        log.info("rank %d of %d: %d examples of %d", r, w, len(loader.sampler), n)
        reset_bytes_reduced()
        kw = dict(variant=args.variant, group=group, progress=False if args.no_progress else None,
                  check_parameters=False)
        if args.repr == "ekfac" or (isinstance(representation, dict) and any(
                c.__name__ == "PMatEKFAC" for c in representation.values())):
            kw["update_diag"] = True  # EKFAC's point: the diagonal re-fitted in its basis
        with Timer() as t:
            if args.trials:
                F = FIM_MonteCarlo(model, loader, representation, trials=args.trials, seed=args.seed, **kw)
            else:
                F = FIM(model, loader, representation, **kw)
        summary.update(seconds=round(t.seconds, 4), bytes_reduced=bytes_reduced(), resumed=False)
        meta = {"variant": args.variant, "model": args.model, "data": args.data, "trials": args.trials,
                "n": n, "world_size": w, "seconds": summary["seconds"]}
        save(F, args.out, overwrite=True, meta=meta, group=group, fingerprint=fingerprint)
    summary["d"] = F.layer_collection.numel()
    summary.update(_summary_numbers(F))
    print_summary(summary, r)
    return summary


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: exit status 0, or 1 with one ``error: ...`` line on stderr (2 for an
    invalid option, from the argument parser)."""
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
