"""Model + data -> numbers: hooks, passes over outputs, per-layer kernels."""
from .generator import Generator, default_function
from .statistics import Statistics

__all__ = ["Generator", "Statistics", "default_function"]
