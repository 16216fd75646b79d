"""Process groups: joining the one torchrun describes, and asking who we are in it.

Conventions used by every module of :mod:`nngeo_dist.dist`:

- ``group=None`` means "the default": the WORLD group when :mod:`torch.distributed` is
  initialised, otherwise a single process (no collective is ever issued). Use
  :func:`resolve_group` to turn a user's ``group`` argument into the group to use; after
  resolution ``None`` means exactly "one process".
- Ranks are ranks *within the group* (``0 .. world_size(group) - 1``), not global ranks.
- Tensors handed to a collective live on :func:`collective_device` (``cuda`` for NCCL,
  ``cpu`` for gloo); results are moved back to where the caller's tensors were.
"""
from __future__ import annotations

import inspect
import logging
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("nngeo_dist.dist")

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "NNGEO_DIST_TIMEOUT"


def is_initialized() -> bool:
    """Whether torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def torchrun_env_present() -> bool:
    """Whether the environment describes a process group (torchrun / env:// variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_backend() -> str:
    """``nccl`` when CUDA is available, ``gloo`` otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_timeout(timeout_s: Optional[float] = None) -> timedelta:
    """The collective timeout: ``timeout_s``, else env ``NNGEO_DIST_TIMEOUT``, else 600 s."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV)
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(
                f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to e.g. 600"
            ) from None
    if timeout_s <= 0:
        raise ValueError(f"the process-group timeout must be positive, got {timeout_s} s")
    return timedelta(seconds=timeout_s)


def local_rank() -> int:
    """This process's rank on its node (env ``LOCAL_RANK``, 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_rank() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.

    When fewer GPUs are visible than local ranks (e.g. one GPU per process through
    ``CUDA_VISIBLE_DEVICES``), the local rank is taken modulo the visible device count.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def _uses_nccl(backend: str) -> bool:
    return "nccl" in str(backend).lower()


def init_from_env(
    backend: Optional[str] = None, timeout_s: Optional[float] = None
) -> Optional["dist.ProcessGroup"]:
    """Join the process group the environment (torchrun, env://) describes.

    Returns the WORLD group, or ``None`` when no such environment is present (a plain
    ``python`` run: one process). Idempotent: when a default group already exists it is
    returned as is. ``backend`` defaults to NCCL when CUDA is available, gloo otherwise;
    with NCCL the CUDA device is set from ``LOCAL_RANK`` first. ``timeout_s`` bounds every
    collective (default: env ``NNGEO_DIST_TIMEOUT`` or 600 s).
    """
    if is_initialized():
        return dist.group.WORLD
    if not torchrun_env_present():
        return None
    if not dist.is_available():
        raise RuntimeError(
            "the environment describes a process group (RANK, WORLD_SIZE) but this torch "
            "build has no torch.distributed; install a torch with distributed support"
        )
    backend = backend or default_backend()
    kwargs = {"backend": backend, "init_method": "env://", "timeout": resolve_timeout(timeout_s)}
    if _uses_nccl(backend):
        device = device_for_rank()
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    logger.debug(
        "joined process group: rank %d of %d, backend %s",
        dist.get_rank(), dist.get_world_size(), backend,
    )
    return dist.group.WORLD


def resolve_group(group=None):
    """The group to use: ``group`` if given; else WORLD if initialised; else ``None``.

    After resolution, ``None`` means a single process and no collective is issued.
    """
    if group is not None:
        return group
    if is_initialized():
        return dist.group.WORLD
    return None


def rank(group=None) -> int:
    """This process's rank in ``resolve_group(group)`` (0 for a single process)."""
    group = resolve_group(group)
    return 0 if group is None else dist.get_rank(group)


def world_size(group=None) -> int:
    """The number of processes in ``resolve_group(group)`` (1 for a single process)."""
    group = resolve_group(group)
    return 1 if group is None else dist.get_world_size(group)


def is_single_process(group=None) -> bool:
    """Whether ``group`` resolves to one process, so that no collective is needed."""
    return world_size(group) == 1


def global_rank(group, group_rank: int) -> int:
    """The global rank of the process whose rank in ``group`` is ``group_rank``."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def collective_device(group=None) -> torch.device:
    """The device tensors must be on for ``group``'s backend: cuda for NCCL, else cpu."""
    group = resolve_group(group)
    if group is None:
        return torch.device("cpu")
    if _uses_nccl(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
