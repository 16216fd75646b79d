"""Fingerprints of model parameters, and checks that every rank holds the same thing.

A fingerprint is the sha256 hex digest of the parameters' names (when known), dtypes,
shapes and raw bytes, in order; it is deterministic across processes and machines of the
same byte order, and independent of the device the parameters are on.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import Tensor

from .agree import all_gather_ints, all_gather_objects, digest, ranks_by_value
from .errors import on_every_rank
from .group import resolve_group, world_size

Parameters = Union[torch.nn.Module, Mapping[str, Tensor], Iterable[Tensor]]

PARAMETERS_HINT = (
    "load the same weights on every rank (one checkpoint for all, or the same seed "
    "before building the model)"
)


def _named_tensors(model_or_tensors: Parameters) -> list[tuple[Optional[str], Tensor]]:
    if isinstance(model_or_tensors, torch.nn.Module):
        return list(model_or_tensors.named_parameters())
    if isinstance(model_or_tensors, Tensor):
        return [(None, model_or_tensors)]
    if isinstance(model_or_tensors, Mapping):
        return list(model_or_tensors.items())
    return [(None, t) for t in model_or_tensors]


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` on cpu, row-major (any dtype, bfloat16 included)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def parameter_fingerprint(model_or_tensors: Parameters) -> str:
    """sha256 hex digest of parameter names, dtypes, shapes and bytes, in order.

    Accepts a module (its ``named_parameters()``), a mapping name -> tensor, a tensor, or
    an iterable of tensors.
    """
    h = hashlib.sha256()
    for name, t in _named_tensors(model_or_tensors):
        h.update(repr((name, str(t.dtype), tuple(t.shape))).encode())
        if t.numel():
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def _short(value: str) -> str:
    """A value as a message shows it: whole when short (a path, a tile size), the head of
    a long one (a 64-digit hash)."""
    return value if len(value) <= 80 else value[:16] + "..."


def _who(by_value: list[list[int]]) -> str:
    if len(by_value) == 2 and all(len(r) == 1 for r in by_value):
        return f"ranks {by_value[0][0]} and {by_value[1][0]}"
    return "ranks " + " | ".join(",".join(map(str, r)) for r in by_value)


def _listing(values: list[str]) -> str:
    return "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {_short(values[r[0]])}"
                     for r in ranks_by_value(values))


def _differ_message(what: str, values: list, hint: Optional[str]) -> str:
    """Which ranks differ and in what: for mappings (a job's settings), each key whose
    value differs, with every rank's value."""
    advice = f"; {hint}" if hint else ""
    if all(isinstance(v, Mapping) for v in values):
        by_value = ranks_by_value([repr(sorted(v.items())) for v in values])
        keys = sorted({k for v in values for k in v}, key=str)
        parts = [f"{k} ({_listing([str(v.get(k)) for v in values])})"
                 for k in keys if len({str(v.get(k)) for v in values}) > 1]
        return f"{what} differ between {_who(by_value)}: " + ", ".join(parts) + advice
    return f"{what} differ between {_who(ranks_by_value(values))}: {_listing(values)}{advice}"


def check_same_across_ranks(
    value: Union[str, Mapping[str, str]], what: str, group=None, hint: Optional[str] = None
) -> None:
    """Raise the same RuntimeError on every rank unless every rank passed the same ``value``
    (a string, or a mapping of named settings: the message then names each that differs).

    ``what`` names the thing in the message ("the model parameters"); ``hint`` says how to
    fix it. One all_gather of an int64 digest; the values themselves are gathered only on
    a mismatch. A no-op for a single process. Every rank of ``group`` must call it.
    """
    group = resolve_group(group)
    if world_size(group) == 1:
        return
    if isinstance(value, Mapping):
        value = {str(k): str(v) for k, v in value.items()}
    key = repr(sorted(value.items())) if isinstance(value, Mapping) else str(value)
    digests = [g[0] for g in all_gather_ints([digest(key)], group)]
    if len(set(digests)) == 1:
        return
    values = all_gather_objects(value, group)
    raise on_every_rank(RuntimeError(_differ_message(what, values, hint)))


def check_same_parameters(model_or_tensors: Parameters, group=None) -> str:
    """Check every rank holds the same parameters (RuntimeError on all ranks if not).

    Returns the fingerprint.
    """
    fingerprint = parameter_fingerprint(model_or_tensors)
    check_same_across_ranks(fingerprint, "the model parameters", group, PARAMETERS_HINT)
    return fingerprint


# ---------------------------------------------------------------- whole models

MODEL_HINT = (
    "every rank must hold the same model: load the same weights (and buffers, e.g. "
    "BatchNorm running statistics) on every rank, e.g. one checkpoint for all or the same "
    "seed before building the model, and do not step an optimizer on one rank only"
)

def model_fingerprint(model: torch.nn.Module) -> str:
    """:func:`parameter_fingerprint` of the model's parameters and buffers (the running
    statistics of normalisation layers change what the model computes).

    Hashed afresh at every call: version counters miss edits through ``.data`` (the usual
    ``p.data.add_(...)`` update), so no cached digest can be trusted."""
    named = [(n, p) for n, p in model.named_parameters()]
    named += [("buffer:" + n, b) for n, b in model.named_buffers()]
    return parameter_fingerprint(dict(named))


def check_same_model(model: torch.nn.Module, group=None) -> str:
    """Raise the same RuntimeError on every rank of ``group`` unless every rank's
    ``model`` has the same parameters and buffers (names, dtypes, shapes, values).

    One all_gather of an 8-byte digest when they agree (a no-op for one process); the
    message names the ranks that differ. Every rank of the group must call it. Returns
    this rank's fingerprint."""
    fp = model_fingerprint(model)
    check_same_across_ranks(fp, "the model parameters", group, MODEL_HINT)
    return fp
