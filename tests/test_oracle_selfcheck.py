"""The oracle checked against definitions computed another way.

- per-example Jacobians against a plain loop of ``torch.autograd.grad`` over examples and
  outputs, for every model of the zoo;
- the closed-form FIMs against the Fisher's definition E_{y ~ p(y|x)}[g g^T], g the gradient
  of log p(y|x), built from the same loop;
- the Gram tensor against the brute-force Jacobians, and against the FIM's trace;
- ``nngeometry`` 0.4 (the reference package) against the oracle, which documents that it is a
  valid second oracle and that ``models.nngeometry_supported`` tells exactly which zoo models
  it handles.
"""
from __future__ import annotations

import pytest
import torch

import oracle
from checks import default_dtype, rel
from models import MODELS, NNGEOMETRY_SUPPORTED, loader_of, nngeometry_supported

RTOL = 1e-10
ALL = list(MODELS)


def examples(batches):
    """Yields each example as a tuple of tensors with a batch dimension of 1."""
    for batch in batches:
        for i in range(batch[0].shape[0]):
            yield tuple(t[i : i + 1] for t in batch)


def brute_grads(model, scalar_fns, batches, params=None):
    """G[a, i, :] = d scalar_fns(out_i)[a] / d params, by one autograd.grad per example and
    per entry; ``scalar_fns(out, example) -> 1-d tensor``. Returns (G, outputs)."""
    params = list(model.parameters()) if params is None else list(params)
    rows, outs = [], []
    for ex in examples(batches):
        out = model(ex[0])
        vals = scalar_fns(out, ex)
        per_entry = []
        for a in range(vals.shape[0]):
            gs = torch.autograd.grad(vals[a], params, retain_graph=True, allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]
            per_entry.append(torch.cat([g.reshape(-1) for g in gs]))
        rows.append(torch.stack(per_entry))  # (entries, d)
        outs.append(out.detach().reshape(-1))
    return torch.stack(rows, dim=1), torch.stack(outs)  # (entries, n, d), (n, c)


def brute_jacobian(model, batches, params=None):
    return brute_grads(model, lambda out, ex: out.reshape(-1), batches, params)


# ------------------------------------------------------------------------------------------
# Jacobians


@pytest.mark.parametrize("name", ALL)
def test_jacobian_matches_autograd_loop(name):
    model, batches, c = MODELS[name]()
    J, f = oracle.jacobian_and_outputs(model, None, batches)
    J_ref, f_ref = brute_jacobian(model, batches)
    n = sum(b[0].shape[0] for b in batches)
    d = sum(p.numel() for p in model.parameters())
    assert J.shape == (c, n, d) and J.dtype == torch.float64
    assert f.shape == (n, c)
    assert rel(J, J_ref) < RTOL
    assert rel(f, f_ref) < RTOL
    # outputs per example equal the batched forward (eval mode: no batch statistics)
    with torch.no_grad():
        f_batched = torch.cat([model(b[0]) for b in batches])
    assert rel(f, f_batched) < RTOL
    assert J.abs().sum(dim=(0, 1)).gt(0).float().mean() > 0.5  # not degenerate


def test_embedding_padding_row_has_no_gradient():
    model, batches, c = MODELS["embedding_padidx"]()
    assert any((b[0] == 0).any() for b in batches)
    J = oracle.per_example_jacobian(model, None, batches, params=[model[0].weight])
    J = J.reshape(c, -1, 7, 4)
    assert J[:, :, 0].abs().max() == 0
    assert J[:, :, 1:].abs().max() > 0


def test_jacobian_parameter_subset_in_given_order():
    model, batches, c = MODELS["mixed_cnn"]()
    all_params = list(model.parameters())
    subset = [all_params[5], all_params[0], all_params[-1]]  # not in model order
    J = oracle.per_example_jacobian(model, None, batches, params=subset)
    J_ref, _ = brute_jacobian(model, batches, params=subset)
    assert J.shape[2] == sum(p.numel() for p in subset)
    assert rel(J, J_ref) < RTOL
    # columns of the full Jacobian, picked in the subset's order
    J_full = oracle.per_example_jacobian(model, None, batches)
    start_of, s = {}, 0
    for p in all_params:
        start_of[id(p)] = s
        s += p.numel()
    idx = torch.cat([torch.arange(start_of[id(p)], start_of[id(p)] + p.numel()) for p in subset])
    assert rel(J, J_full[:, :, idx]) < RTOL


def test_jacobian_of_a_custom_function_with_targets():
    model, batches, c = MODELS["batchnorm2d"]()

    def function(x, y):
        return torch.log_softmax(model(x), dim=1).gather(1, y.unsqueeze(1))

    J = oracle.per_example_jacobian(model, function, batches)
    J_ref, _ = brute_grads(
        model, lambda out, ex: torch.log_softmax(out, 1)[0, ex[1]].reshape(1), batches
    )
    assert J.shape[0] == 1
    assert rel(J, J_ref) < RTOL
    # empirical Fisher = covariance of gradients of that function
    n = J.shape[1]
    F = oracle.fim_dense(model, batches, "function", function=function)
    assert rel(F, J_ref[0].T @ J_ref[0] / n) < RTOL


def test_float32_model_is_refused():
    model, batches, _ = MODELS["linear"]()
    model = model.float()
    with pytest.raises(TypeError, match="float64"):
        oracle.per_example_jacobian(model, None, [(b[0].float(),) for b in batches])


# ------------------------------------------------------------------------------------------
# FIMs against the definition E_y[g g^T]


@pytest.mark.parametrize("name", ["linear", "conv2d_stride_pad", "batchnorm2d", "layernorm_seq", "embedding"])
def test_fim_classif_logits_is_expected_outer_product_of_score(name):
    model, batches, c = MODELS[name]()
    F = oracle.fim_dense(model, batches, "classif_logits")
    # G[y, i] = d log p(y | x_i) / dw for every class y
    G, out = brute_grads(model, lambda o, ex: torch.log_softmax(o, dim=1)[0], batches)
    p = torch.softmax(out, dim=1)  # (n, c)
    n = out.shape[0]
    F_def = torch.einsum("iy,yik,yil->kl", p, G, G) / n
    assert F.shape == F_def.shape
    assert rel(F, F_def) < RTOL
    # and the closed form written with the brute-force Jacobian
    J, _ = brute_jacobian(model, batches)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    F_direct = sum(J[:, i].T @ H[i] @ J[:, i] for i in range(n)) / n
    assert rel(F, F_direct) < RTOL
    assert torch.allclose(F, F.T, rtol=0, atol=1e-14 * F.abs().max())


def test_fim_binary_logits_is_expected_outer_product_of_score():
    model, batches, c = MODELS["linear_binary"]()
    assert c == 1
    F = oracle.fim_dense(model, batches, "classif_binary_logits")
    G, out = brute_grads(
        model,
        lambda o, ex: torch.stack([torch.nn.functional.logsigmoid(-o[0, 0]), torch.nn.functional.logsigmoid(o[0, 0])]),
        batches,
    )
    s = torch.sigmoid(out[:, 0])
    probs = torch.stack([1 - s, s], dim=1)  # (n, 2): p(y=0), p(y=1)
    F_def = torch.einsum("iy,yik,yil->kl", probs, G, G) / out.shape[0]
    assert rel(F, F_def) < RTOL
    with pytest.raises(ValueError):
        oracle.fim_dense(*MODELS["linear"]()[:2], "classif_binary_logits")


@pytest.mark.parametrize("name", ["linear_nobias", "groupnorm1d"])
def test_fim_regression_is_mean_JtJ(name):
    model, batches, c = MODELS[name]()
    F = oracle.fim_dense(model, batches, "regression")
    J, _ = brute_jacobian(model, batches)
    n = J.shape[1]
    assert rel(F, torch.einsum("aik,ail->kl", J, J) / n) < RTOL
    assert rel(oracle.fim_dense(model, batches, "function"), F) < RTOL
    with pytest.raises(ValueError):
        oracle.fim_dense(model, batches, "no_such_variant")


# ------------------------------------------------------------------------------------------
# Gram


@pytest.mark.parametrize("name", ["conv1d", "rmsnorm"])
def test_gram_matches_autograd_loop_and_fim_trace(name):
    model, batches, c = MODELS[name]()
    K = oracle.gram(model, None, batches)
    J, _ = brute_jacobian(model, batches)
    n = J.shape[1]
    assert K.shape == (c, n, c, n)
    K_ref = torch.einsum("aik,bjk->aibj", J, J)
    assert rel(K, K_ref) < RTOL
    assert rel(K, K.permute(2, 3, 0, 1)) < RTOL
    # sum_{a,i} K[a,i,a,i] = n trace(F_regression)
    diag = torch.einsum("aiai->", K)
    tr = torch.trace(oracle.fim_dense(model, batches, "regression"))
    assert abs(diag - n * tr) / abs(diag) < RTOL


# ------------------------------------------------------------------------------------------
# flat parameters


def test_flat_params_roundtrip_and_order():
    model, batches, _ = MODELS["mixed_cnn"]()
    v = oracle.flat_params(model)
    assert torch.equal(v, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    w = v + 0.01 * torch.arange(v.numel(), dtype=v.dtype) / v.numel()
    oracle.set_flat_params(model, w)
    assert torch.equal(oracle.flat_params(model), w)
    v[:] = 0  # a copy, not a view
    assert torch.equal(oracle.flat_params(model), w)
    with pytest.raises(ValueError):
        oracle.set_flat_params(model, w[:-1])
    sub = [list(model.parameters())[-1]]
    oracle.set_flat_params(model, torch.zeros(sub[0].numel(), dtype=w.dtype), params=sub)
    assert torch.equal(oracle.flat_params(model, params=sub), torch.zeros(sub[0].numel(), dtype=w.dtype))


# ------------------------------------------------------------------------------------------
# nngeometry 0.4 as a second oracle


def nngeometry_fim_dense(model, batches, variant):
    pytest.importorskip("nngeometry")
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDense

    with default_dtype(torch.float64):
        return FIM(
            model=model, loader=loader_of(batches), representation=PMatDense, variant=variant
        ).to_torch()


def test_nngeometry_agrees_with_oracle_linear_classif_logits():
    model, batches, _ = MODELS["linear"]()
    F_ref = oracle.fim_dense(model, batches, "classif_logits")
    F = nngeometry_fim_dense(model, batches, "classif_logits")
    assert F.dtype == torch.float64
    assert rel(F, F_ref) < RTOL


@pytest.mark.parametrize("name", sorted(NNGEOMETRY_SUPPORTED))
def test_nngeometry_agrees_on_every_supported_model(name):
    model, batches, c = MODELS[name]()
    variant = "classif_binary_logits" if c == 1 else "classif_logits"
    F_ref = oracle.fim_dense(model, batches, variant)
    F = nngeometry_fim_dense(model, batches, variant)
    assert rel(F, F_ref) < RTOL


@pytest.mark.parametrize("name", [n for n in ALL if not nngeometry_supported(n)])
def test_nngeometry_fails_on_every_unsupported_model(name):
    pytest.importorskip("nngeometry")
    model, batches, c = MODELS[name]()
    with pytest.raises(Exception):
        nngeometry_fim_dense(model, batches, "classif_logits")
