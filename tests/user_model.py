"""A user's own model and data set, as the command line imports them
(``--model user_model:mlp --data user_model:blobs`` with tests/ on PYTHONPATH)."""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import Dataset


def mlp(in_features: int = 5, width: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    """Linear -> tanh -> Linear, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, classes))


def mlp_seeded_by_rank(**kw) -> nn.Module:
    """A faulty factory: every rank builds different weights (seeded by its RANK)."""
    return mlp(seed=int(os.environ.get("RANK", "0")), **kw)


class Blobs(Dataset):
    """``n`` Gaussian points in ``in_features`` dims, labels from a random linear teacher."""

    def __init__(self, n: int = 40, in_features: int = 5, classes: int = 3, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_features, generator=g)
        self.y = (self.x @ torch.randn(in_features, classes, generator=g)).argmax(1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def blobs(**kw) -> Blobs:
    return Blobs(**kw)
