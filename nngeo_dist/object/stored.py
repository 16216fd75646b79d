"""Store-backed objects: the NTK Gram tensor, the Jacobian and the low-rank FIM, living in
a zarr store (DESIGN.md §4) and operated on out of core, through dask.

- :class:`FMatStored`: Gram tensor ``(c, n, c, n)``, chunks ``(c, B, c, B)``. ``mv``,
  ``vTMv``, ``trace``, ``frobenius_norm``, ``get_diag``, top-k eigenpairs (randomised,
  QR power iterations), normalised Gram and kernel PCA, ``to_dask``/``to_xarray``.
- :class:`PushForwardStored` / :class:`PullBackStored`: Jacobian ``(c, n, d)``, chunks
  ``(c, B, D0)``: ``J v`` and ``J^T u``.
- :class:`PMatLowRankStored`: ``M = J^T J / n`` with ``J`` the Jacobian of the FIM square
  root, stored as above: ``mv``, ``vTMv``, ``trace``, ``get_diag``, ``frobenius_norm``,
  ``to_torch``, top-k eigenpairs.

Every operation streams the store chunk by chunk (whatever dask scheduler is active), and
runs locally on the process that calls it (every rank holds the same store: no
collective). Results are tensors of the store's dtype, on the device of the vector an
operation answers (``mv(v)``: ``v``'s), else on the model's device when the object was
built from a model, else on the cpu, like the in-memory objects' results. ``build``
computes the store (under a process group, or on dask workers with ``engine='dask'``)
and returns the object; the constructor opens an existing store.

    K = GramMatrix(model, loader, store="gram.zarr", tile=1024)   # FMatStored
    K = FMatStored("gram.zarr")                                   # reopen it later
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .vector import FVector, PVector

__all__ = ["FMatStored", "PushForwardStored", "PullBackStored", "PMatLowRankStored", "open_stored"]


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _flat(x: Any) -> Any:
    """An FVector's or PVector's flat tensor; anything else as it is."""
    if isinstance(x, (FVector, PVector)):
        return x.get_flat_representation()
    return x


def _as_numpy(x: Any) -> np.ndarray:
    from ..store.tiles import as_numpy

    return as_numpy(_flat(x))


def _build_kw(kw: dict) -> dict:
    """Builder arguments common to every store-backed object (``store=`` is required)."""
    if kw.get("store") is None:
        raise ValueError("a store-backed object needs store=PATH (a zarr directory or URL)")
    return kw


class _Stored:
    """Common state: the store path, its spec, a lazily opened dask view."""

    kind: str = ""

    def __init__(self, store: Any, storage_options: Optional[dict] = None, check: bool = True):
        from ..store import read_spec
        from ..store.layout import _store_name

        self.store = store
        self.path = _store_name(store)
        self.storage_options = storage_options
        self.spec = read_spec(store, storage_options)
        if self.kind and self.spec.kind not in (self.kind if isinstance(self.kind, tuple) else (self.kind,)):
            raise ValueError(
                f"the store at {self.path} holds a {self.spec.kind!r} array, not a {self.kind!r} one"
            )
        if check:
            from ..store import check_complete

            check_complete(store, storage_options)
        self._dask = None
        self.report = None  # the JobReport of the build that made it, when built here

    @property
    def dtype(self) -> torch.dtype:
        return _torch_dtype(self.spec.dtype)

    def _device(self, like: Any = None) -> torch.device:
        """Where results go, as for the in-memory objects: the device of the tensor an
        operation answers (``like``: ``v`` of ``mv(v)``), else the model's when the object
        was built from one, else the cpu."""
        if isinstance(like, Tensor):
            return like.device
        generator = getattr(self, "generator", None)
        return generator.device if generator is not None else torch.device("cpu")

    def _out(self, x: Any, like: Any = None) -> Tensor:
        """A result computed out of core (numpy), in the store's dtype on :meth:`_device`."""
        return torch.as_tensor(np.asarray(x)).to(device=self._device(like), dtype=self.dtype)

    def to_dask(self):
        """The stored array as a lazy dask array with the store's chunks."""
        if self._dask is None:
            from ..store import to_dask

            self._dask = to_dask(self.store, storage_options=self.storage_options)
        return self._dask

    def to_xarray(self):
        """The stored array as a lazy, labelled ``xarray.DataArray``."""
        from ..store import to_xarray

        return to_xarray(self.store, storage_options=self.storage_options)

    def to_torch(self) -> Tensor:
        """The whole array in memory (only for stores that fit)."""
        return self._out(self.to_dask().compute())

    def verify(self):
        """Recompute every tile's checksum: a :class:`~nngeo_dist.store.VerifyReport`."""
        from ..store import verify

        return verify(self.store, storage_options=self.storage_options)

    def check_integrity(self) -> None:
        """Raise ``ValueError`` naming the altered tiles if any tile's data changed."""
        rep = self.verify()
        if not rep.ok:
            raise ValueError(
                f"the store at {self.path} was altered after it was written: {rep}. Rerun the "
                "job that wrote it with resume=True (--resume): altered tiles are recomputed."
            )

    def size(self, dim: Optional[int] = None):
        s = torch.Size(self.spec.shape)
        return s if dim is None else s[dim]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, shape={tuple(self.spec.shape)}, chunks={tuple(self.spec.chunks)}, dtype={self.spec.dtype})"


# ---------------------------------------------------------------------------------------
# Gram
# ---------------------------------------------------------------------------------------
class FMatStored(_Stored):
    """The NTK Gram tensor ``K`` ``(c, n, c, n)`` in a zarr store; as a matrix, ``(c n, c n)``
    output-major (flat index ``a*n + i``), like :class:`~nngeo_dist.object.FMatDense`."""

    kind = "gram"

    def __init__(self, store: Any, generator=None, storage_options: Optional[dict] = None, check: bool = True):
        super().__init__(store, storage_options, check)
        self.generator = generator
        self.evals = self.evecs = None

    @classmethod
    def build(cls, generator, loader, group=None, store=None, tile=None, resume: bool = True,
              overwrite: bool = False, engine: str = "torchrun", **kw) -> "FMatStored":
        """Compute the Gram store (see :func:`nngeo_dist.store.gram.build_gram_store`;
        ``engine='dask'``: :func:`nngeo_dist.store.engine_dask.build_gram_store_dask`,
        with ``client``/``scheduler``/``workers``) and open it.

        Keyword arguments: ``dtype``, ``outputs`` (``'all'``, a list of indices,
        ``('diff', c1, c2)``), ``function_id``, ``progress``, ``tile_log``,
        ``verify_on_resume``, ``batch_size``, ``storage_options``.
        """
        from ..store.engine_dask import build_gram_store_engine

        _build_kw({"store": store})
        if engine == "torchrun":
            kw["group"] = group
        elif group is not None:
            raise ValueError("engine='dask' runs from one process: do not pass group=")
        report = build_gram_store_engine(engine, generator, loader, store, tile=tile,
                                         resume=resume, overwrite=overwrite, **kw)
        obj = cls(store, generator, storage_options=kw.get("storage_options"))
        obj.report = report
        return obj

    # shape --------------------------------------------------------------------------------
    @property
    def c(self) -> int:
        return self.spec.shape[0]

    @property
    def n(self) -> int:
        return self.spec.shape[1]

    @property
    def tile(self) -> int:
        return self.spec.chunks[1]

    def _vec(self, v: Any) -> np.ndarray:
        x = _as_numpy(v)
        if x.size != self.c * self.n:
            raise ValueError(f"expected an FVector of shape ({self.c}, {self.n}), got {tuple(x.shape)}")
        return x.reshape(self.c, self.n)

    # operations ---------------------------------------------------------------------------
    def mv(self, v: Any) -> FVector:
        """``K v`` for an FVector ``(c, n)`` (one pass over the store)."""
        from ..store import gram_mv

        v = _flat(v)
        return FVector(self._out(gram_mv(self.to_dask(), self._vec(v).astype(np.float64)), v))

    def vTMv(self, v: Any) -> Tensor:
        v = _flat(v)
        x = self._vec(v).astype(np.float64)
        from ..store import gram_mv

        return self._out(np.float64((gram_mv(self.to_dask(), x) * x).sum()), v)

    def trace(self) -> Tensor:
        """``sum_{a,i} K[a, i, a, i]`` (reads the diagonal tiles only)."""
        from ..store import gram_trace

        return self._out(np.float64(gram_trace(self.to_dask())))

    def frobenius_norm(self) -> Tensor:
        from ..store import frobenius

        return self._out(np.float64(frobenius(self.to_dask())))

    def get_diag(self) -> Tensor:
        """The ``c n`` diagonal entries, flat index ``a*n + i``."""
        from ..store import gram_diag

        return self._out(np.asarray(gram_diag(self.to_dask()).compute()).reshape(-1))

    def top_eigenpairs(self, k: int = 10, n_power_iter: int = 4, seed: int = 0,
                       n_oversamples: int = 10) -> tuple[Tensor, Tensor]:
        """Top-``k`` eigenpairs, randomised (QR power iterations), out of core:
        ``(eigenvalues (k,) descending, eigenvectors (c n, k))``."""
        from ..store import top_eigenpairs

        w, U = top_eigenpairs(self.to_dask(), k, n_power_iter=n_power_iter, seed=seed,
                              n_oversamples=n_oversamples)
        return self._out(w), self._out(U)

    def compute_eigendecomposition(self, k: Optional[int] = None, **kw) -> tuple[Tensor, Tensor]:
        """Like ``FMatDense.compute_eigendecomposition`` (eigenvalues ascending, eigenvectors
        as columns) but only the top ``k`` (default ``min(c n, 100)``), randomised."""
        k = k or min(self.c * self.n, 100)
        w, U = self.top_eigenpairs(k, **kw)
        self.evals, self.evecs = w.flip(0), U.flip(1)
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def normalised(self):
        """Lazy dask array of ``K_ij / sqrt(K_ii K_jj)`` (the paper's Figure 7 colour map)."""
        from ..store import normalised_gram

        return normalised_gram(self.to_dask())

    def kernel_pca(self, k: int = 2, center: bool = False, **kw) -> Tensor:
        """Projections ``sqrt(lambda_j) u_j`` of the ``c n`` points on the top-``k``
        components, ``(c n, k)`` (the paper's Figure 7); ``center=True`` centres the kernel."""
        from ..store import kernel_pca

        return self._out(kernel_pca(self.to_dask(), k=k, center=center, **kw))

    def to_memory(self):
        """An in-memory :class:`~nngeo_dist.object.FMatDense` (only for stores that fit)."""
        from .fspace import FMatDense

        return FMatDense(self.to_torch(), self.generator)


# ---------------------------------------------------------------------------------------
# Jacobian
# ---------------------------------------------------------------------------------------
def _jac_build(generator, loader, group, store, tile, resume, overwrite, kind, kw):
    from ..store.jacobian import build_jacobian_store

    _build_kw({"store": store})
    engine = kw.pop("engine", "torchrun")
    if engine != "torchrun":
        raise ValueError(
            f"engine={engine!r}: a {kind} store is computed by the ranks of a process group "
            "(engine='torchrun', the default; one process or torchrun); the dask engine "
            "computes Gram stores only"
        )
    return build_jacobian_store(generator, loader, store, tile=tile, group=group, resume=resume,
                                overwrite=overwrite, kind=kind, **kw)


class PushForwardStored(_Stored):
    """The Jacobian ``J`` ``(c, n, d)`` in a zarr store, as a push-forward ``v -> J v``."""

    kind = ("jacobian", "lowrank")

    def __init__(self, layer_collection, store: Any, generator=None, storage_options: Optional[dict] = None,
                 check: bool = True):
        super().__init__(store, storage_options, check)
        self.layer_collection = layer_collection
        self.generator = generator
        if layer_collection is not None and layer_collection.numel() != self.spec.shape[2]:
            raise ValueError(
                f"the store at {self.path} has d={self.spec.shape[2]} parameters, the layer "
                f"collection {layer_collection.numel()}"
            )

    @classmethod
    def build(cls, generator, loader, group=None, store=None, tile=None, resume: bool = True,
              overwrite: bool = False, **kw) -> "PushForwardStored":
        """Compute the Jacobian store (``tile``: examples per chunk; ``d_chunk``: parameters
        per chunk; see :func:`nngeo_dist.store.jacobian.build_jacobian_store`) and open it."""
        report = _jac_build(generator, loader, group, store, tile, resume, overwrite, "jacobian", kw)
        obj = cls(generator.layer_collection, store, generator, kw.get("storage_options"))
        obj.report = report
        return obj

    def mv(self, v: PVector) -> FVector:
        """``J v``: ``(c, n)``."""
        from ..store import jac_mv

        v = _flat(v)
        x = _as_numpy(v).astype(np.float64)
        return FVector(self._out(jac_mv(self.to_dask(), x), v))

    jvp = mv

    def transpose(self) -> "PullBackStored":
        return PullBackStored(self.layer_collection, self.store, self.generator, self.storage_options,
                              check=False)

    def vjp(self, u: FVector) -> PVector:
        return self.transpose().mv(u)


class PullBackStored(PushForwardStored):
    """``J^T`` of a stored Jacobian: ``u (c, n) -> J^T u (d,)``."""

    @classmethod
    def build(cls, generator, loader, group=None, store=None, tile=None, resume: bool = True,
              overwrite: bool = False, **kw) -> "PullBackStored":
        return PushForwardStored.build(generator, loader, group, store, tile, resume, overwrite, **kw).transpose()

    def mv(self, u: Any) -> PVector:  # type: ignore[override]
        from ..store import jac_rmv

        u = _flat(u)
        x = _as_numpy(u).astype(np.float64)
        return PVector(self.layer_collection, vector_repr=self._out(jac_rmv(self.to_dask(), x), u))

    def transpose(self) -> PushForwardStored:  # type: ignore[override]
        return PushForwardStored(self.layer_collection, self.store, self.generator, self.storage_options,
                                 check=False)


# ---------------------------------------------------------------------------------------
# low-rank FIM
# ---------------------------------------------------------------------------------------
class PMatLowRankStored:
    """``M = J^T J / n`` with ``J`` ``(c, n, d)`` (the Jacobian of the FIM square root) in a
    zarr store; the out-of-core counterpart of :class:`~nngeo_dist.object.PMatLowRank`.

    ``FIM(model, loader, PMatLowRankStored, store="fim_lowrank.zarr")``.
    """

    def __init__(self, layer_collection, store: Any, generator=None, storage_options: Optional[dict] = None,
                 check: bool = True):
        self.J = PushForwardStored(layer_collection, store, generator, storage_options, check)
        self.layer_collection = layer_collection
        self.generator = generator
        self.store = store
        self.path = self.J.path
        self.spec = self.J.spec
        self.n = self.spec.shape[1]
        self.evals = self.evecs = None
        self.report = None

    @classmethod
    def build(cls, generator, loader, group=None, store=None, tile=None, resume: bool = True,
              overwrite: bool = False, **kw) -> "PMatLowRankStored":
        """Compute the store of the FIM square root's Jacobian (kind ``'lowrank'``; records
        ``variant`` when given) and open it."""
        variant = kw.pop("variant", None)
        if variant is not None:
            kw["meta"] = {**(kw.get("meta") or {}), "variant": variant}
            if kw.get("function_id") is None:
                # FIM wraps the user's function in the variant's square root: name both
                from ..store.job import function_identity

                inner = function_identity(kw.pop("user_function", None))
                kw["function_id"] = f"fim_root[{variant}]({inner})"
        report = _jac_build(generator, loader, group, store, tile, resume, overwrite, "lowrank", kw)
        obj = cls(generator.layer_collection, store, generator, kw.get("storage_options"))
        obj.report = report
        return obj

    @property
    def dtype(self) -> torch.dtype:
        return self.J.dtype

    def to_dask(self):
        """The Jacobian ``(c, n, d)`` as a dask array (``M = J^T J / n``)."""
        return self.J.to_dask()

    def _check_vector(self, v: PVector) -> None:
        if not isinstance(v, PVector):
            raise TypeError(f"expected a PVector, got {type(v).__name__}")
        if v.layer_collection != self.layer_collection:
            raise ValueError("the PVector belongs to another LayerCollection than this matrix")

    def _vector(self, x: Any, like: Any = None) -> PVector:
        return PVector(self.layer_collection, vector_repr=self.J._out(x, like))

    def _scalar(self, x: float, like: Any = None) -> Tensor:
        return self.J._out(np.float64(x), like)

    def size(self, dim: Optional[int] = None):
        d = self.spec.shape[2]
        s = torch.Size([d, d])
        return s if dim is None else s[dim]

    def mv(self, v: PVector) -> PVector:
        """``J^T (J v) / n`` (two passes over the store)."""
        from ..store import jac_mv, jac_rmv

        self._check_vector(v)
        J = self.to_dask()
        v = _flat(v)
        u = jac_mv(J, _as_numpy(v).astype(np.float64))
        return self._vector(jac_rmv(J, u) / self.n, v)

    def vTMv(self, v: PVector) -> Tensor:
        """``||J v||^2 / n`` (one pass)."""
        from ..store import jac_mv

        self._check_vector(v)
        v = _flat(v)
        u = jac_mv(self.to_dask(), _as_numpy(v).astype(np.float64))
        return self._scalar(float((u * u).sum()) / self.n, v)

    def trace(self) -> Tensor:
        import dask.array as da

        J = self.to_dask().astype(np.float64)
        return self._scalar(float(da.square(J).sum().compute()) / self.n)

    def get_diag(self) -> Tensor:
        import dask.array as da

        J = self.to_dask().astype(np.float64)
        return self.J._out(np.asarray(da.square(J).sum(axis=(0, 1)).compute()) / self.n)

    def frobenius_norm(self) -> Tensor:
        """``||J^T J||_F / n = ||J J^T||_F / n``, from the ``(c, B, c, B)`` blocks of ``J J^T``
        (one pass over pairs of row tiles)."""
        import dask.array as da

        J = self.to_dask().astype(np.float64)
        G = da.tensordot(J, J, axes=([2], [2]))
        return self._scalar(float(np.sqrt(da.square(G).sum().compute())) / self.n)

    def to_torch(self) -> Tensor:
        """The dense ``(d, d)`` matrix (only when it fits in memory)."""
        import dask.array as da

        J = self.to_dask().astype(np.float64)
        M = np.asarray(da.tensordot(J, J, axes=([0, 1], [0, 1])).compute()) / self.n
        return self.J._out(M)

    def _gram_matmat(self, X: np.ndarray) -> np.ndarray:
        """``(J J^T / n) X`` for ``X`` ``(c n, l)``, two passes."""
        import dask.array as da

        J = self.to_dask()
        c, n, d = J.shape
        l = X.shape[1]
        Xd = da.from_array(X.reshape(c, n, l), chunks=(c, J.chunks[1], l))
        Y = da.tensordot(J, Xd, axes=([0, 1], [0, 1])).compute()  # (d, l)
        Yd = da.from_array(np.asarray(Y), chunks=(J.chunks[2], l))
        return np.asarray(da.tensordot(J, Yd, axes=([2], [0])).compute()).reshape(c * n, l) / self.n

    def compute_eigendecomposition(self, k: Optional[int] = None, n_power_iter: int = 4, seed: int = 0,
                                   n_oversamples: int = 10) -> tuple[Tensor, Tensor]:
        """Top-``k`` eigenpairs of ``M`` (default ``min(c n, d, 100)``), randomised, out of
        core: eigenvalues ascending ``(k,)``, eigenvectors ``(d, k)`` (like
        ``PMatLowRank.compute_eigendecomposition``, restricted to the top ``k``)."""
        from ..store.streaming import _eigen_from_operator
        from ..store import jac_rmv

        c, n, d = self.spec.shape
        k = k or min(c * n, d, 100)
        w, U = _eigen_from_operator(self._gram_matmat, c * n, k, n_power_iter, n_oversamples, seed)
        # eigenvectors of J^T J / n from those of J J^T / n: v = J^T u / sqrt(n w)
        J = self.to_dask()
        V = np.stack([jac_rmv(J, U[:, j]) for j in range(k)], axis=1)
        V = V / np.sqrt(np.clip(w, 1e-300, None) * n)[None, :]
        self.evals = self.J._out(w[::-1].copy())
        self.evecs = self.J._out(V[:, ::-1].copy())
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        raise NotImplementedError(
            "PMatLowRankStored has no out-of-core solve; load it with .to_memory() "
            "(a PMatLowRank) when c*n*d fits in memory, or use PMatImplicit with an iterative solver"
        )

    def inverse(self, regul: float = 1e-8):
        raise NotImplementedError(
            "PMatLowRankStored has no out-of-core inverse; load it with .to_memory() "
            "(a PMatLowRank) when c*n*d fits in memory, or use PMatDense / PMatKFAC instead"
        )

    def to_memory(self):
        """An in-memory :class:`~nngeo_dist.object.PMatLowRank` (only for stores that fit)."""
        from .pspace.lowrank import PMatLowRank

        return PMatLowRank(self.layer_collection, self.J.to_torch(), self.n, self.generator)

    def verify(self):
        return self.J.verify()

    def __repr__(self) -> str:
        return f"PMatLowRankStored({self.path!r}, J shape={tuple(self.spec.shape)})"


def open_stored(store: Any, layer_collection=None, storage_options: Optional[dict] = None):
    """The store-backed object of an existing store: FMatStored (Gram), PushForwardStored
    (Jacobian) or PMatLowRankStored (low-rank FIM)."""
    from ..store import read_spec

    spec = read_spec(store, storage_options)
    kind = spec.kind
    if layer_collection is None and isinstance(spec.meta.get("layers"), list):
        from ..store.objects import _layers_from_attr  # recorded by Jacobian / low-rank jobs

        layer_collection = _layers_from_attr(spec.meta["layers"])
    if kind == "gram":
        return FMatStored(store, storage_options=storage_options)
    if kind == "jacobian":
        return PushForwardStored(layer_collection, store, storage_options=storage_options)
    if kind == "lowrank":
        if layer_collection is None:
            raise ValueError("opening a low-rank FIM store needs its layer_collection (not recorded in it)")
        return PMatLowRankStored(layer_collection, store, storage_options=storage_options)
    raise ValueError(f"the store at {store} holds a {kind!r} array: not a Gram, Jacobian or low-rank store")
