"""nngeo_dist: Fisher Information Matrices and empirical NTKs for PyTorch, on one process
or many, in memory or out of core."""
from .layercollection import LayerCollection
from .metrics import FIM, FIM_MonteCarlo, GramMatrix, Jacobian

__version__ = "0.1.0"


def load(path, group=None, **kw):
    """Open a matrix saved with ``.save(path)`` (any representation); ``device=``,
    ``storage_options=`` are passed on."""
    from .store.objects import load as _load

    return _load(path, group=group, **kw)


__all__ = ["FIM", "FIM_MonteCarlo", "GramMatrix", "Jacobian", "LayerCollection", "load", "__version__"]
