"""Model + data -> numbers: hooks, passes over outputs, per-layer kernels."""
from .generator import Generator, as_batches, batch_examples, default_function, is_empty_batch
from .statistics import Statistics, no_example_error

__all__ = ["Generator", "Statistics", "as_batches", "batch_examples", "default_function", "is_empty_batch",
           "no_example_error"]
