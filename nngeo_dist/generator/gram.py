"""Gram tensors (c, n, c, n) from per-layer Gram features, written once for every layer type.

A layer's Gram features (:meth:`LayerMath.gram_features`) are a tuple
``(kind, per_output, per_example, bias)``: ``per_output`` is (K, N, ...) (one row per
output function and example), ``per_example`` is (N, ...) or None. That layout is all this
module needs to slice features by outputs or examples, so the layers
only know how to pair two feature sets (:meth:`LayerMath.gram_pair_into`).

Features of one pass come per batch and per chunk of outputs, as
``[(N, [{layer: features}, ...]), ...]`` (:meth:`Generator.gram_features`): each is a
*cell*, a rectangle of the Gram's rows, and blocks are computed cell by cell (never
copying the features into one tensor: per-example gradients can be larger than the Gram).

A symmetric Gram (examples against themselves) computes each pair of cells once and
mirrors it; within a cell, rows are tiled: each tile of rows is multiplied against the
columns from its own start on, and the blocks below the diagonal are mirrored. With tiles
of :data:`ROW_TILE` rows, about half of the (c n)^2 products are made.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .statistics import no_example_error

#: rows (output, example pairs) per product when a symmetric Gram is tiled: narrow enough
#: that the skipped lower blocks are about half of the matrix, wide enough that each
#: product runs near the machine's matmul rate
ROW_TILE = 256


def take(f: dict, outputs: slice = slice(None), examples: slice = slice(None)) -> dict:
    """The features ``{layer: features}`` of some outputs and examples (views)."""
    out = {}
    for name, (kind, q, x, bias) in f.items():
        out[name] = (kind, q[outputs, examples], None if x is None else x[examples], bias)
    return out


def _per_output(f: dict) -> Tensor:
    """A feature set's (K, N, ...) per-output tensor (its first layer's): K, N, dtype."""
    return next(iter(f.values()))[1]


def cells(feats: list) -> list:
    """[(output slice, example slice, {layer: features})] of per-batch features: one
    rectangle of the Gram's rows per batch and chunk of outputs (never copied into one)."""
    if not feats:
        raise no_example_error()
    out, e0 = [], 0
    for n_b, chunks in feats:
        k0 = 0
        for f in chunks:
            K = _per_output(f).shape[0]
            out.append((slice(k0, k0 + K), slice(e0, e0 + n_b), f))
            k0 += K
        e0 += n_b
    return out


def _extent(cs: list) -> tuple[int, int]:
    return max(c[0].stop for c in cs), max(c[1].stop for c in cs)


def extent(feats: list) -> tuple[int, int, torch.dtype]:
    """(c outputs, n examples, dtype) of per-batch features."""
    cs = cells(feats)
    return (*_extent(cs), _per_output(cs[0][2]).dtype)


def input_pairs(maths: dict, f1: dict, f2: dict) -> dict:
    """{layer: the example-only part of its Gram contribution} (shared by output tiles)."""
    return {name: math.gram_input_pair(f1[name], f2[name]) for name, math in maths.items()}


def pair_into(maths: dict, f1: dict, f2: dict, out: Tensor, inputs: Optional[dict] = None) -> Tensor:
    """out (K1, N1, K2, N2) = the Gram block between two feature sets: the sum over the
    layers ``maths`` ({name: LayerMath}) of their contributions, accumulated in place
    (``inputs``: :func:`input_pairs` of the two, when already computed)."""
    inputs = inputs or input_pairs(maths, f1, f2)
    for i, (name, math) in enumerate(maths.items()):
        math.gram_pair_into(f1[name], f2[name], out, i > 0, inputs[name])
    return out


def block(maths: dict, rows: list, cols: list, out: Optional[Tensor] = None) -> Tensor:
    """(c, n1, c, n2) Gram block between the examples of two lists of per-batch features,
    one product per pair of their cells, into ``out`` (any strided view) when given."""
    rc, cc = cells(rows), cells(cols)
    if out is None:
        (c, n1), (_, n2) = _extent(rc), _extent(cc)
        out = _per_output(rc[0][2]).new_empty(c, n1, c, n2)
    for ks, es, f in rc:
        for ks2, es2, f2 in cc:
            pair_into(maths, f, f2, out[ks, es, ks2, es2])
    return out


def symmetric(maths: dict, feats: list, out: Optional[Tensor] = None) -> Tensor:
    """(c, n, c, n) Gram of the examples of per-batch features with themselves, into
    ``out`` (any strided view of that shape) when given: each cell against itself
    (:func:`_diagonal`), each pair of cells once, the transpose mirrored."""
    cs = cells(feats)
    c, n = _extent(cs)
    if out is None:
        out = _per_output(cs[0][2]).new_empty(c, n, c, n)
    for i, (ks, es, f) in enumerate(cs):
        _diagonal(maths, f, out[ks, es, ks, es])
        for ks2, es2, f2 in cs[i + 1:]:
            pair_into(maths, f, f2, out[ks, es, ks2, es2])
            out[ks2, es2, ks, es] = out[ks, es, ks2, es2].permute(2, 3, 0, 1)
    return out


def _diagonal(maths: dict, f: dict, out: Tensor) -> Tensor:
    """out (K, N, K, N) = the Gram of one feature set with itself.

    Rows are tiled by example tiles of ``E`` examples and, within an example tile's
    diagonal block, by tiles of ``kt`` outputs, so that a tile holds about
    :data:`ROW_TILE` rows; every tile is multiplied against the columns from its own
    start on (one product) and the block below it is mirrored.
    """
    c, n = out.shape[:2]
    if c * n <= 2 * ROW_TILE:  # one tile: nothing to save
        return pair_into(maths, f, f, out)
    tiles = -(-c * n // ROW_TILE)
    E = -(-n // max(1, -(-tiles // c)))
    kt = max(1, ROW_TILE // E)
    for e0 in range(0, n, E):
        e, later = slice(e0, min(n, e0 + E)), slice(e0 + E, n)
        rows = take(f, examples=e)
        inputs = input_pairs(maths, rows, rows)
        for k0 in range(0, c, kt):
            k1 = min(c, k0 + kt)
            pair_into(maths, take(rows, outputs=slice(k0, k1)), take(rows, outputs=slice(k0, c)),
                      out[k0:k1, e, k0:, e], inputs)
            out[k1:, e, k0:k1, e] = out[k0:k1, e, k1:, e].permute(2, 3, 0, 1)
        if e0 + E < n:
            pair_into(maths, rows, take(f, examples=later), out[:, e, :, later])
            out[:, later, :, e] = out[:, e, :, later].permute(2, 3, 0, 1)
    return out


__all__ = ["ROW_TILE", "take", "cells", "extent", "input_pairs", "pair_into", "block", "symmetric"]
