"""The objects a user holds: vectors, parameter-space and function-space matrices, maps."""
from .fspace import FMatDense, ShardedFVector
from .map import PullBackDense, PushForwardDense, PushForwardImplicit
from .pspace import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
)
from .vector import FVector, PVector, random_pvector

__all__ = [
    "PVector", "FVector", "random_pvector",
    "PMatAbstract", "PMatDense", "PMatDiag", "PMatBlockDiag", "PMatLowRank", "PMatImplicit",
    "FMatDense", "ShardedFVector", "PushForwardDense", "PushForwardImplicit", "PullBackDense",
]
from .pspace import PMatEKFAC, PMatKFAC, PMatMixed, PMatQuasiDiag

__all__ += ["PMatKFAC", "PMatEKFAC", "PMatQuasiDiag", "PMatMixed"]
from .stored import FMatStored, PMatLowRankStored, PullBackStored, PushForwardStored

__all__ += ["FMatStored", "PushForwardStored", "PullBackStored", "PMatLowRankStored"]
