"""Out-of-core linear algebra over store arrays, through dask.

Gram arrays ``K`` of shape ``(c, n, c, n)`` are treated as the symmetric PSD matrix
``M`` of shape ``(c*n, c*n)`` with the flat index ``a*n + i`` (C order of ``(c, n)``), i.e.
``M = K.reshape(c*n, c*n)``. Vectors on that index may be given as ``(c*n,)`` or ``(c, n)``.
A 2-D ``(N, N)`` array is accepted as ``M`` itself.

Jacobian arrays ``J`` have shape ``(c, n, d)``: ``jac_mv`` is ``J v`` (``(d,) -> (c, n)``),
``jac_rmv`` is ``J^T u`` (``(c, n) -> (d,)``).

Every function takes a dask array (e.g. :func:`~nngeo_dist.store.views.to_dask`), a numpy
array, a torch tensor, or a store path (opened with ``to_dask``; complete stores only).
Work is expressed blockwise on the array's own chunks (one tile each), so memory is bounded
by a few chunks per dask worker plus the ``(c*n, k)`` vectors; the 4-D tensors are never
reshaped to 2-D (that would make dask merge the ``n`` chunks). Whatever dask scheduler is
active (threads by default, or a ``dask.distributed`` client) runs the work.

Results are numpy arrays / Python floats, except :func:`normalised_gram` (lazy dask).
"""

from __future__ import annotations

from typing import Any, Callable

import dask.array as da
import numpy as np

from .tiles import as_numpy

__all__ = [
    "as_dask",
    "gram_mv",
    "gram_matmat",
    "gram_diag",
    "gram_trace",
    "frobenius",
    "top_eigenpairs",
    "normalised_gram",
    "kernel_pca",
    "jac_mv",
    "jac_rmv",
]


def as_dask(arr: Any) -> da.Array:
    """dask array from a dask/numpy array, torch tensor, zarr array, or store path."""
    if isinstance(arr, da.Array):
        return arr
    if isinstance(arr, (str,)) or hasattr(arr, "__fspath__"):
        from .views import to_dask

        return to_dask(arr)
    if hasattr(arr, "chunks") and hasattr(arr, "shape") and not isinstance(arr, np.ndarray):
        return da.from_zarr(arr, chunks=arr.chunks) if _is_zarr(arr) else da.asarray(arr)
    return da.from_array(as_numpy(arr))


def _is_zarr(arr: Any) -> bool:
    return type(arr).__module__.startswith("zarr")


def _gram_dims(K: da.Array) -> tuple[int, int]:
    """``(c, n)`` of a Gram array (4-D ``(c, n, c, n)``; 2-D ``(N, N)`` gives ``(1, N)``)."""
    if K.ndim == 4:
        c, n, c2, n2 = K.shape
        if (c, n) != (c2, n2):
            raise ValueError(f"a Gram array has shape (c, n, c, n), got {K.shape}")
        return c, n
    if K.ndim == 2 and K.shape[0] == K.shape[1]:
        return 1, K.shape[0]
    raise ValueError(f"expected a (c, n, c, n) Gram array or a square matrix, got shape {K.shape}")


def gram_matmat(arr: Any, X: Any) -> np.ndarray:
    """``M @ X`` for ``X`` of shape ``(c*n, l)``; returns ``(c*n, l)``. One pass over ``arr``."""
    K = as_dask(arr)
    c, n = _gram_dims(K)
    X = as_numpy(X)
    if X.ndim != 2 or X.shape[0] != c * n:
        raise ValueError(f"X must have shape ({c * n}, l), got {X.shape}")
    l = X.shape[1]
    if K.ndim == 2:
        Y = da.tensordot(K, X, axes=([1], [0]))
    else:
        X3 = X.reshape(c, n, l)
        X3d = da.from_array(X3, chunks=(c, K.chunks[3], l))
        Y = da.tensordot(K, X3d, axes=([2, 3], [0, 1]))
    return np.asarray(Y.compute()).reshape(c * n, l)


def gram_mv(arr: Any, v: Any) -> np.ndarray:
    """``M v`` for ``v`` of shape ``(c*n,)`` or ``(c, n)``; returns the same shape as ``v``.

    For a 4-D Gram: ``out[a, i] = sum_{b, j} K[a, i, b, j] v[b, j]``.
    """
    v = as_numpy(v)
    K = as_dask(arr)
    c, n = _gram_dims(K)
    if v.size != c * n:
        raise ValueError(f"v must have {c * n} entries ((c, n) = ({c}, {n})), got shape {v.shape}")
    return gram_matmat(K, v.reshape(c * n, 1)).reshape(v.shape)


def _block_diag(block: np.ndarray) -> np.ndarray:
    """``block[a, i, a, i]`` as ``(c, b)`` of a diagonal tile ``(c, b, c, b)``."""
    return np.einsum("aiai->ai", block)


def gram_diag(arr: Any) -> da.Array:
    """Lazy diagonal of ``M`` as a dask array of shape ``(c, n)`` (``(N,)`` for 2-D input).

    Only the diagonal tiles ``K[:, I-tile, :, I-tile]`` are read.
    """
    K = as_dask(arr)
    c, n = _gram_dims(K)
    if K.ndim == 2:
        return da.diagonal(K)
    parts = []
    start = 0
    for b in K.chunks[1]:
        s = slice(start, start + b)
        blk = K[:, s, :, s].rechunk((c, b, c, b))
        parts.append(blk.map_blocks(_block_diag, drop_axis=[2, 3], dtype=K.dtype, chunks=((c,), (b,))))
        start += b
    return da.concatenate(parts, axis=1)


def gram_trace(arr: Any) -> float:
    """``trace(M) = sum_{a, i} K[a, i, a, i]``, reading only the diagonal tiles."""
    return float(gram_diag(arr).sum(dtype=np.float64).compute())


def frobenius(arr: Any) -> float:
    """Frobenius norm ``sqrt(sum K^2)`` (accumulated in float64), one pass over ``arr``."""
    K = as_dask(arr)
    return float(np.sqrt(da.square(K.astype(np.float64)).sum().compute()))


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (deterministic output)."""
    idx = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1
    return vecs * signs


def _eigen_from_operator(
    matmat: Callable[[np.ndarray], np.ndarray],
    N: int,
    k: int,
    n_power_iter: int,
    n_oversamples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomised subspace iteration + Rayleigh-Ritz for a symmetric PSD operator.

    Halko, Martinsson & Tropp (2011), Alg. 4.4 then 5.3: ``Q = qr(M Omega)``, then
    ``n_power_iter`` times ``Q = qr(M Q)``, then ``eigh(Q^T M Q)``. ``n_power_iter + 2``
    passes over ``M``.
    """
    if not 1 <= k <= N:
        raise ValueError(f"k must be in [1, {N}], got {k}")
    l = min(N, k + max(0, n_oversamples))
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(matmat(rng.standard_normal((N, l))))
    for _ in range(n_power_iter):
        Q, _ = np.linalg.qr(matmat(Q))
    T = Q.T @ matmat(Q)
    T = 0.5 * (T + T.T)
    w, U = np.linalg.eigh(T)
    order = np.argsort(w)[::-1][:k]
    return w[order], _fix_signs(Q @ U[:, order])


def top_eigenpairs(
    arr: Any,
    k: int,
    n_power_iter: int = 4,
    seed: int = 0,
    n_oversamples: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eigenpairs of the symmetric PSD matrix ``M`` (``(c*n, c*n)``), out of core.

    Randomised range finder with QR-orthonormalised power (subspace) iterations, then a
    small Rayleigh-Ritz ``eigh``. Each of the ``n_power_iter + 2`` passes streams the store
    once, blockwise; memory holds ``(c*n, k + n_oversamples)`` vectors.

    Returns:
        ``(eigenvalues (k,), eigenvectors (c*n, k))``, eigenvalues descending; eigenvector
        ``j`` is column ``j``, on the flat index ``a*n + i``, with its largest-magnitude
        entry positive.
    """
    K = as_dask(arr)
    c, n = _gram_dims(K)
    return _eigen_from_operator(lambda X: gram_matmat(K, X), c * n, k, n_power_iter, n_oversamples, seed)


def normalised_gram(arr: Any) -> da.Array:
    """Lazy ``K_ij / sqrt(K_ii K_jj)`` on ``M``'s index, as a dask array of ``arr``'s shape.

    This is the colour map of the nngeometry paper's Figure 7 (rows and columns scaled by
    ``1/sqrt(diag)``). Zero diagonal entries give inf/nan in their row and column.
    """
    K = as_dask(arr)
    s = 1.0 / da.sqrt(gram_diag(K))
    if K.ndim == 2:
        return K * s[:, None] * s[None, :]
    return K * s[:, :, None, None] * s[None, None, :, :]


def kernel_pca(
    arr: Any,
    k: int = 2,
    center: bool = False,
    n_power_iter: int = 4,
    seed: int = 0,
    n_oversamples: int = 10,
) -> np.ndarray:
    """Projections of the ``c*n`` points on the top-``k`` principal components of the kernel.

    As in the nngeometry paper's Figure 7: the top eigenvectors of the Gram matrix scaled by
    the square root of their eigenvalues, ``proj[:, j] = sqrt(lambda_j) u_j``. With
    ``center=True`` the kernel is centred first (``H M H``, ``H = I - 11^T/N``; standard kernel
    PCA), implicitly, without forming it.

    Returns:
        ``(c*n, k)`` array; for ``c = 1`` row ``i`` is example ``i``, otherwise row ``a*n + i``
        is output ``a`` of example ``i`` (``.reshape(c, n, k)`` to split them).
    """
    K = as_dask(arr)
    c, n = _gram_dims(K)
    N = c * n
    if center:
        ones = np.ones((N, 1))
        m = gram_matmat(K, ones) / N  # row means (N, 1)
        mu = float(m.mean())

        def matmat(X: np.ndarray) -> np.ndarray:
            s = ones.T @ X  # (1, l)
            return gram_matmat(K, X) - ones @ (m.T @ X) - m @ s + mu * ones @ s

    else:

        def matmat(X: np.ndarray) -> np.ndarray:
            return gram_matmat(K, X)

    w, U = _eigen_from_operator(matmat, N, k, n_power_iter, n_oversamples, seed)
    return U * np.sqrt(np.clip(w, 0.0, None))[None, :]


def _check_jac(J: da.Array) -> tuple[int, int, int]:
    if J.ndim != 3:
        raise ValueError(f"a Jacobian array has shape (c, n, d), got {J.shape}")
    return J.shape  # type: ignore[return-value]


def jac_mv(arr: Any, v_d: Any) -> np.ndarray:
    """``J v``: ``out[a, i] = sum_p J[a, i, p] v[p]``; ``v_d`` ``(d,)`` -> ``(c, n)``.

    Blockwise over the store's ``(c, B, D0)`` chunks: each chunk meets its ``(D0,)`` slice
    of ``v``, partial ``(c, B)`` sums are added per row panel.
    """
    J = as_dask(arr)
    c, n, d = _check_jac(J)
    v = as_numpy(v_d).reshape(-1)
    if v.shape[0] != d:
        raise ValueError(f"v must have shape ({d},), got {v.shape}")
    vd = da.from_array(v, chunks=(J.chunks[2],))
    return np.asarray(da.tensordot(J, vd, axes=([2], [0])).compute())


def jac_rmv(arr: Any, u_cn: Any) -> np.ndarray:
    """``J^T u``: ``out[p] = sum_{a, i} J[a, i, p] u[a, i]``; ``u_cn`` ``(c, n)`` or ``(c*n,)`` -> ``(d,)``.

    Blockwise over the store's ``(c, B, D0)`` chunks, partial ``(D0,)`` sums added over row
    panels.
    """
    J = as_dask(arr)
    c, n, d = _check_jac(J)
    u = as_numpy(u_cn)
    if u.size != c * n:
        raise ValueError(f"u must have shape ({c}, {n}), got {u.shape}")
    ud = da.from_array(u.reshape(c, n), chunks=(c, J.chunks[1]))
    return np.asarray(da.tensordot(J, ud, axes=([0, 1], [0, 1])).compute())
