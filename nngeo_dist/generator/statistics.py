"""Additive statistics: the seam between a pass over data, a reduction, and finalising.

Every representation is built as ``statistics -> reduce -> finalise``. A pass over a shard
of data returns a :class:`Statistics`: named *sums* over examples plus the number of
examples summed. Two disjoint shards combine with ``+``; a process group combines with
:meth:`Statistics.reduce`. Finalising (dividing by ``count``, eigendecompositions) is the
representation's business and never happens here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


def no_example_error() -> ValueError:
    """The one error for a computation that saw no example, whichever quantity it is: the
    loader yields no batch, or only batches of 0 examples (in a group: on every rank)."""
    return ValueError(
        "no example was seen: the loader (or every rank's shard) is empty or yields only "
        "batches of 0 examples; pass a loader that yields at least one example"
    )


@dataclass
class Statistics:
    """Named sums over examples and the example count.

    ``sums``: name -> tensor, each a sum over the examples counted in ``count``.
    ``symmetric``: names whose tensors are symmetric in their last two dimensions; a
    reduction may send only their upper triangles.
    """

    sums: dict[str, Tensor]
    count: int
    symmetric: frozenset = field(default_factory=frozenset)

    def __add__(self, other: "Statistics") -> "Statistics":
        if set(self.sums) != set(other.sums):
            raise ValueError(
                "cannot add statistics with different names: "
                f"{sorted(self.sums)} vs {sorted(other.sums)}"
            )
        return Statistics(
            {k: self.sums[k] + other.sums[k] for k in self.sums},
            self.count + other.count,
            self.symmetric | other.symmetric,
        )

    def reduce(self, group=None) -> "Statistics":
        """Sum over the ranks of ``group`` (a no-op for one process)."""
        from ..dist.reduce import all_reduce_statistics

        return all_reduce_statistics(self, group).check_finite()

    def check_finite(self) -> "Statistics":
        """Raise if a sum holds NaN or Inf (the same verdict on every rank after a reduce)."""
        bad = [k for k, v in self.sums.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(
                f"the sums {bad[:3]} contain NaN or Inf: some per-example gradients are not "
                "finite (e.g. an Inf or NaN input that the network saturates, or overflow in "
                "float16); check the data, or compute in float32/float64"
            )
        return self

    def mean(self, name: str) -> Tensor:
        """The sum ``name`` divided by the example count."""
        if self.count == 0:
            raise no_example_error()
        return self.sums[name] / self.count

    def to(self, device: Optional[torch.device] = None, dtype=None) -> "Statistics":
        return Statistics(
            {k: v.to(device=device, dtype=dtype) for k, v in self.sums.items()},
            self.count,
            self.symmetric,
        )
