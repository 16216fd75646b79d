"""The paper's Figure 7 on digits: the NTK Gram matrix of a binary classifier f_c2 - f_c1
between two classes, normalised, and the examples projected on its first two principal
components, before and after training. Writes ntk_kernel_pca.png.

    python examples/ntk_kernel_pca.py
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader, TensorDataset

from nngeo_dist import GramMatrix
from nngeo_dist.cli_common import digits_dataset, digits_mlp

C1, C2, PER_CLASS = 3, 8, 50
x, y = digits_dataset().tensors
idx = torch.cat([(y == C1).nonzero()[:PER_CLASS, 0], (y == C2).nonzero()[:PER_CLASS, 0]])
loader = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=50)
labels = y[idx]

fig, axes = plt.subplots(2, 2, figsize=(8, 8))
for col, steps in enumerate([0, 300]):
    model = digits_mlp(hidden=64, train_steps=steps)

    def f_c1_c2(x, y, model=model):
        out = model(x)
        return out[:, C2:C2 + 1] - out[:, C1:C1 + 1]

    K = GramMatrix(model, loader, function=f_c1_c2)
    G = K.to_torch()[0, :, 0, :].double()
    d = G.diagonal().sqrt()
    axes[0, col].imshow((G / d[:, None] / d[None, :]).numpy(), cmap="viridis")
    axes[0, col].set_title(f"normalised NTK Gram, {steps} training steps")
    evals, evecs = torch.linalg.eigh(G)
    proj = evecs[:, -2:] * evals[-2:].clamp_min(0).sqrt()
    for c, m in ((C1, "o"), (C2, "x")):
        sel = labels == c
        axes[1, col].scatter(proj[sel, 1], proj[sel, 0], marker=m, label=f"class {c}")
    axes[1, col].legend()
    axes[1, col].set_title("kernel PCA: first two components")
fig.tight_layout()
fig.savefig("ntk_kernel_pca.png", dpi=80)
print("wrote ntk_kernel_pca.png")
