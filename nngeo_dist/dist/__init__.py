"""Distribution: process groups, exact sharding, reductions, fingerprints, fault handling.

See the module docstrings for the conventions: ``group=None`` resolves to WORLD when
torch.distributed is initialised and to a single process otherwise.
"""
from .errors import RankFailedError, collective_errors, run_collectively
from .exchange import (
    all_gather_rows,
    broadcast_from,
    broadcast_structures,
    gather_rows,
    reduce_tensor,
)
from .fingerprint import (
    check_same_across_ranks,
    check_same_model,
    check_same_parameters,
    model_fingerprint,
    parameter_fingerprint,
)
from .group import (
    collective_device,
    device_for_rank,
    init_from_env,
    rank,
    resolve_group,
    world_size,
)
from .reduce import (
    all_gather_tensors_varlen,
    all_reduce_statistics,
    all_reduce_tensor,
    broadcast_object,
    broadcast_tensor,
    bytes_naive,
    bytes_reduced,
    reset_bytes_reduced,
)
from .sharding import ShardSampler, shard_loader, shard_range

__all__ = [
    "RankFailedError", "collective_errors", "run_collectively",
    "all_gather_rows", "broadcast_from", "broadcast_structures", "gather_rows", "reduce_tensor",
    "check_same_across_ranks", "check_same_model", "check_same_parameters",
    "model_fingerprint", "parameter_fingerprint",
    "collective_device", "device_for_rank", "init_from_env", "rank", "resolve_group",
    "world_size",
    "all_gather_tensors_varlen", "all_reduce_statistics", "all_reduce_tensor",
    "broadcast_object", "broadcast_tensor", "bytes_naive", "bytes_reduced", "reset_bytes_reduced",
    "ShardSampler", "shard_loader", "shard_range",
]
