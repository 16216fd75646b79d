"""The objects a user holds: vectors, parameter-space and function-space matrices, maps."""
from .fspace import FMatDense, ShardedFVector
from .map import PFMapDense, PFMapImplicit, PullBackDense, PushForwardDense, PushForwardImplicit
from .pspace import (
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatLowRank,
)
from .vector import FVector, PVector, random_fvector, random_pvector, random_pvector_dict

__all__ = [
    "PVector", "FVector", "random_pvector", "random_pvector_dict", "random_fvector",
    "PMatAbstract", "PMatDense", "PMatDiag", "PMatBlockDiag", "PMatLowRank", "PMatImplicit",
    "FMatDense", "ShardedFVector", "PushForwardDense", "PushForwardImplicit", "PullBackDense",
    "PFMapDense", "PFMapImplicit",  # nngeometry 0.4's names of the push-forwards
]
from .pspace import PMatEKFAC, PMatKFAC, PMatMixed, PMatQuasiDiag

__all__ += ["PMatKFAC", "PMatEKFAC", "PMatQuasiDiag", "PMatMixed"]
from .stored import FMatStored, PMatLowRankStored, PullBackStored, PushForwardStored

__all__ += ["FMatStored", "PushForwardStored", "PullBackStored", "PMatLowRankStored"]
