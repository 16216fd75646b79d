"""The paper's Figure 1, ported: v^T F v for a KFAC and a dense Fisher of one model.

Runs in seconds on scikit-learn's bundled digits (no download):
    python examples/fisher_figure1.py
"""
import torch
from torch.utils.data import DataLoader

from nngeo_dist import FIM
from nngeo_dist.cli_common import digits_dataset, digits_mlp
from nngeo_dist.object import PMatDense, PMatKFAC, PVector

model = digits_mlp(hidden=16)
loader = DataLoader(digits_dataset(), batch_size=256)

F_kfac = FIM(model=model, loader=loader, representation=PMatKFAC, n_output=10)
F_full = FIM(model=model, loader=loader, representation=PMatDense, n_output=10)

v = PVector.from_model(model)
print(f"v^T F v  KFAC: {F_kfac.vTMv(v).item():.6g}   dense: {F_full.vTMv(v).item():.6g}")
print(f"trace    KFAC: {F_kfac.trace().item():.6g}   dense: {F_full.trace().item():.6g}")

# natural gradient step direction for the loss gradient, damped
model.zero_grad()
x, y = next(iter(loader))
torch.nn.functional.cross_entropy(model(x), y).backward()
g = PVector.from_model_grad(model)
nat = F_kfac.solve(g, regul=1e-3)
print(f"cos(g, F^-1 g) = {(nat.dot(g) / (nat.norm() * g.norm())).item():.4f}")
