"""The objects a user holds: vectors, parameter-space and function-space matrices, maps."""
from .fspace import FMatDense
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
    "FMatDense", "PushForwardDense", "PushForwardImplicit", "PullBackDense",
]
