"""Parameter-space matrices, one representation per module."""
from .base import PMatAbstract
from .blockdiag import PMatBlockDiag
from .dense import PMatDense
from .diag import PMatDiag
from .implicit import PMatImplicit
from .lowrank import PMatLowRank

__all__ = ["PMatAbstract", "PMatDense", "PMatDiag", "PMatBlockDiag", "PMatLowRank", "PMatImplicit"]
from .kfac import PMatKFAC
from .ekfac import PMatEKFAC
from .quasidiag import PMatQuasiDiag
from .mixed import PMatMixed

__all__ += ["PMatKFAC", "PMatEKFAC", "PMatQuasiDiag", "PMatMixed"]
