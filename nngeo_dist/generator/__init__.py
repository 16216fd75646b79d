"""Model + data -> numbers: hooks, passes over outputs, per-layer kernels."""
from .generator import Generator, batch_examples, default_function, is_empty_batch
from .statistics import Statistics, no_example_error

__all__ = ["Generator", "Statistics", "batch_examples", "default_function", "is_empty_batch",
           "no_example_error"]
