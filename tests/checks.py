"""Comparison helpers shared by the tests."""
import torch


def rel(a, b) -> float:
    """Relative error ||a - b|| / ||b|| (Frobenius), 0/0 read as 0."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
