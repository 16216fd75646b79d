"""Function-space objects: the NTK Gram tensor K[a, i, b, j] = J_a(x_i) . J_b(x_j), and
function-space vectors held row-sharded across a process group.

**Row sharding.** In a process group of more than one rank, objects whose size grows with
the number of examples n keep only this rank's examples (its *rows*), never the whole:

- :class:`FMatDense`: rank r holds ``K[:, rows_r, :, :]``, shape (c, n_r, c, n): the Gram
  rows of its own examples against ALL examples;
- :class:`ShardedFVector`: rank r holds ``v[:, rows_r]``, shape (c, n_r).

The global example order is the rank order: rank 0's examples (in its loader's order),
then rank 1's, ... With :func:`nngeo_dist.dist.shard_loader` (contiguous shards) this is
the dataset order, so the result equals the one-process result on the whole dataset.

What each call returns, in a group (one process: everything is already whole):

================================  ==========================================================
``K.local`` / ``v.local``         this rank's rows, no communication
``K.layout``                      the row counts of every rank (:class:`RowLayout`)
``K.to_torch()``                  the whole (c, n, c, n) on every rank (collective)
``v.to_torch()``                  the whole (c, n) on every rank (collective)
``K.gather(dst=None)``            a one-process FMatDense of the whole, on every rank, or on
                                  rank ``dst`` only (``None`` elsewhere) (collective)
``K.mv(v)``                       a ShardedFVector (this rank's rows of K v)
``K.vTMv, trace, frobenius_norm``  scalars, identical on every rank (one all_reduce)
``K.get_diag()``                  the whole diagonal (c n,) on every rank (one all_gather)
``K.compute_eigendecomposition``  the whole spectrum and eigenvectors, computed on rank 0
                                  and broadcast: identical bits on every rank
================================  ==========================================================

"Collective": every rank of the group must make the call, in the same order.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from .groupops import (
    RowLayout,
    agree_ints,
    check_model,
    effective_group,
    examples_hint,
    group_rank,
    group_size,
    group_sum,
    held_group,
    refuse_store,
)
from .pspace.base import check_impl, picklable_state
from .sums import sum_of_squares
from .vector import FVector
from ..generator.generator import is_empty_batch
from ..generator.gram import extent as gram_extent
from ..generator.statistics import no_example_error

log = logging.getLogger("nngeo_dist.object")

EXCHANGES = ("auto", "features", "inputs")


# ---------------------------------------------------------------- row-sharded FVector


class ShardedFVector(FVector):
    """An FVector (c, n) of which this rank holds its rows' columns (c, n_r).

    ``local`` is this rank's part; ``to_torch()`` / ``get_flat_representation()`` assemble
    the whole (c, n) on every rank (collective); ``gather(dst)`` returns a plain FVector
    of the whole (on rank ``dst`` only when given). ``dot`` and ``norm`` reduce over the
    group; ``+``, ``-`` and scalar ``*`` act on the local parts (the other operand is a
    ShardedFVector of the same layout or a whole (c, n) FVector).
    """

    def __init__(self, local: Tensor, group, layout: RowLayout):
        super().__init__(local)
        if local.shape[1] != layout.n_local:
            raise ValueError(
                f"this rank holds {local.shape[1]} columns but the layout gives it {layout.n_local}"
            )
        self.group = group
        self.layout = layout

    @property
    def local(self) -> Tensor:
        """(c, n_r): this rank's part."""
        return self._flat

    def to_torch(self) -> Tensor:
        """The whole (c, n), on every rank (collective)."""
        from ..dist.exchange import all_gather_rows

        return all_gather_rows(self._flat, dim=1, group=self.group)

    get_flat_representation = to_torch

    def gather(self, dst: Optional[int] = None) -> Optional[FVector]:
        """A plain FVector of the whole (c, n): on every rank, or on rank ``dst`` only."""
        from ..dist.exchange import gather_rows

        if dst is None:
            return FVector(self.to_torch())
        full = gather_rows(self._flat, dim=1, dst=dst, group=self.group)
        return None if full is None else FVector(full)

    def size(self) -> torch.Size:
        return torch.Size([self._flat.shape[0], self.layout.n])

    def _other(self, other) -> Tensor:
        return local_part(other, self.layout, self._flat.shape[0])

    def _new(self, local: Tensor) -> "ShardedFVector":
        return ShardedFVector(local, self.group, self.layout)

    def __add__(self, other):
        return self._new(self._flat + self._other(other))

    def __sub__(self, other):
        return self._new(self._flat - self._other(other))

    def __mul__(self, x):
        return self._new(x * self._flat)

    __rmul__ = __mul__

    def dot(self, other) -> Tensor:
        return group_sum((self._flat * self._other(other)).sum(), self.group)

    def norm(self, p: float = 2) -> Tensor:
        x = self._flat.reshape(-1)
        if p == float("inf"):
            import torch.distributed as dist
            from ..dist.group import collective_device

            m = (x.abs().max() if x.numel() else x.new_zeros(())).to(collective_device(self.group))
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
            return m.to(x.device)
        return group_sum(x.abs().pow(p).sum(), self.group) ** (1.0 / p)

    def __repr__(self) -> str:
        c, n = self.size()
        return f"ShardedFVector(c={c}, n={n}, local columns {self.layout.local_slice()})"


def local_part(v, layout: RowLayout, c: Optional[int] = None) -> Tensor:
    """This rank's columns (c, n_r) of an FVector: a ShardedFVector's ``local`` (same
    layout required) or the slice of a whole (c, n) FVector. No communication."""
    if isinstance(v, ShardedFVector):
        if v.layout.counts != layout.counts:
            raise ValueError(
                f"the FVector is sharded as {list(v.layout.counts)} examples per rank, the "
                f"matrix as {list(layout.counts)}: build both from the same shards"
            )
        return v.local
    return _whole_tensor(v, layout, c)[:, layout.local_slice()]


def whole(v, layout: RowLayout, c: Optional[int] = None) -> Tensor:
    """The whole (c, n) of an FVector: gathered (collective) from a ShardedFVector, or as
    given. Every rank must pass the same kind of vector (a ShardedFVector on every rank,
    or a whole FVector on every rank)."""
    if isinstance(v, ShardedFVector):
        local_part(v, layout, c)  # checks the layout
        return v.to_torch()
    return _whole_tensor(v, layout, c)


def _whole_tensor(v, layout: RowLayout, c: Optional[int]) -> Tensor:
    """(c, n) of a whole (not sharded) FVector or tensor. A flat (c n,) one, which
    nngeometry 0.4's ``FMatDense.vTMv`` and ``PFMapDense.vjp`` read as the (c, n)
    output-major, is read so here too (its c is the object's)."""
    x = v.to_torch() if isinstance(v, FVector) else v
    if x.dim() == 1 and c is not None and x.numel() == c * layout.n:
        return x.view(c, layout.n)
    if x.dim() != 2 or x.shape[1] != layout.n or (c is not None and x.shape[0] != c):
        raise ValueError(
            f"expected an FVector of shape ({c if c is not None else 'c'}, {layout.n}) (all "
            f"examples{'' if c is None else f', or flat ({c * layout.n},)'}) or a "
            f"ShardedFVector; got shape {tuple(x.shape)}"
        )
    return x


def make_fvector(local: Tensor, group, layout: RowLayout) -> FVector:
    """A plain FVector for one process, a ShardedFVector in a group."""
    return FVector(local) if group is None else ShardedFVector(local, group, layout)


# ---------------------------------------------------------------- Gram blocks


class _Recording:
    """Iterates ``loader`` and keeps what it yields (the batches of this rank's shard),
    less its batches of 0 examples: the generator skips them as if absent, and a rank
    receiving one (``exchange="inputs"``) would get no features to take a Gram block of."""

    def __init__(self, loader, into: list):
        self.loader, self.into = loader, into

    def __iter__(self):
        for batch in self.loader:
            if is_empty_batch(batch):
                continue
            self.into.append(batch)
            yield batch

    def __len__(self):
        return len(self.loader)


def _gram_rows(generator, loader, group, exchange: str) -> tuple[Tensor, RowLayout, dict]:
    """This rank's Gram rows (c, n_r, c, n) in a group of more than one rank.

    1. each rank computes the per-layer Gram features of its own batches (keeping the
       batches too unless ``exchange="features"``);
    2. one all_gather of (n_r, c, feature bytes, input bytes, failure flag), then each
       rank fills its diagonal block (own x own examples, i <= j mirrored);
    3. for each rank s in turn, s broadcasts either its features ("features") or its
       input batches ("inputs", every rank then computes s's features itself); every
       rank computes the blocks of its rows against s's examples as they arrive.
    ``exchange="auto"`` picks whichever sends fewer bytes over the whole group.
    """
    from ..dist.agree import all_gather_ints
    from ..dist.exchange import broadcast_structures, structure_nbytes

    me, world = group_rank(group), group_size(group)
    hints = [h[0] for h in all_gather_ints([examples_hint(loader)], group)]
    n_total = sum(h for h in hints if h > 0) or None
    if n_total is None or any(h < 0 for h in hints):
        # a common value on every rank (the Gram features' kind depends on it): only
        # the cost model sees it, the values are exact either way
        n_total = max(n_total or 0, 1024)
    recorded: Optional[list] = [] if exchange != "features" else None
    own, error = [], None
    n_local, c, fbytes, ibytes, dtype = 0, -1, 0, 0, generator.dtype
    try:
        source = loader if recorded is None else _Recording(loader, recorded)
        own = generator.gram_features(source, n_total)
        if own:
            c, n_local, dtype = gram_extent(own)
        fbytes = structure_nbytes(own)
        ibytes = structure_nbytes(recorded) if recorded is not None else 0
    except Exception as exc:  # noqa: BLE001 - every rank raises in agree_ints
        error = exc
    rows = agree_ints([n_local, c, fbytes, ibytes], error, group)
    counts = tuple(r[0] for r in rows)
    c = max(r[1] for r in rows)
    layout = RowLayout(counts, me)
    if layout.n == 0:
        raise no_example_error()
    mode = exchange
    if mode == "auto":
        mode = "inputs" if sum(r[3] for r in rows) < sum(r[2] for r in rows) else "features"
    if mode == "features":
        recorded = None
    K = torch.zeros((c, n_local, c, layout.n), dtype=dtype, device=generator.device)
    error = None
    if own:  # this rank's examples against themselves
        try:
            generator.gram_symmetric(own, out=K[:, :, :, layout.offset:layout.offset + n_local])
        except Exception as exc:  # noqa: BLE001 - raised on every rank after the exchange
            error = exc
    sent = 0
    for s in range(world):
        if counts[s] == 0:
            continue
        mine = (own if mode == "features" else recorded) if s == me else None
        col = sum(counts[:s])
        for obj in broadcast_structures(mine, src=s, group=group, device=generator.device):
            if s == me:
                sent += structure_nbytes(obj)
                continue
            if error is not None or n_local == 0:
                continue  # still advance: the broadcasts are collective
            try:
                feats = [obj] if mode == "features" else generator.gram_features([obj], n_total)
                n_obj = sum(f[0] for f in feats)
                generator.gram_block(own, feats, out=K[:, :, :, col:col + n_obj])
                col += n_obj
            except Exception as exc:  # noqa: BLE001
                error = exc
    agree_ints([], error, group)
    info = {"exchange": mode, "bytes_sent": sent,
            "bytes_features": sum(r[2] for r in rows), "bytes_inputs": sum(r[3] for r in rows)}
    log.debug("Gram rows: exchange=%s, this rank broadcast %d bytes (features %d, inputs %d "
              "over the group)", mode, sent, info["bytes_features"], info["bytes_inputs"])
    return K, layout, info


# ---------------------------------------------------------------- FMatDense


class FMatDense:
    """The Gram tensor (c, n, c, n); as a matrix, (c n, c n) output-major.

    One process: ``data`` is the whole tensor. In a group (see the module docstring):
    ``data`` is this rank's rows (c, n_r, c, n) and ``layout`` says who holds which rows.
    """

    def __init__(self, data: Tensor, generator=None, group=None, layout: Optional[RowLayout] = None):
        if data.dim() != 4:
            raise ValueError(f"a Gram tensor is (c, n, c, n); got shape {tuple(data.shape)}")
        self.group = held_group(group)
        if self.group is None:
            if data.shape[:2] != data.shape[2:]:
                raise ValueError(f"a Gram tensor is (c, n, c, n); got shape {tuple(data.shape)}")
            layout = RowLayout.single(data.shape[1])
        elif layout is None:  # collective: learn the other ranks' row counts
            counts = tuple(r[0] for r in agree_ints([data.shape[1]], None, self.group))
            layout = RowLayout(counts, group_rank(self.group))
        if layout.n_local != data.shape[1] or layout.n != data.shape[3] or data.shape[0] != data.shape[2]:
            raise ValueError(
                f"Gram rows of shape {tuple(data.shape)} do not match the layout "
                f"{list(layout.counts)} (rank {layout.rank})"
            )
        self.data = data
        self.generator = generator
        self.layout = layout
        self.exchange_info: dict = {}
        self.evals = self.evecs = None

    @classmethod
    def build(cls, generator, loader, group=None, exchange: str = "auto", check_parameters: bool = True,
              store=None):
        """The Gram tensor of the examples of ``loader`` (this rank's shard in a group).

        ``exchange`` (group only): how the Gram rows against other ranks' examples are
        computed — "features" (each rank broadcasts its per-layer Gram features),
        "inputs" (each rank broadcasts its input batches, receivers compute the features),
        or "auto" (whichever sends fewer bytes). ``check_parameters``: compare a
        fingerprint of the model on every rank first (RuntimeError on every rank if they
        differ).
        """
        refuse_store("FMatDense", "FMatStored", store)
        if exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {exchange!r}; valid: {', '.join(EXCHANGES)}")
        group = effective_group(group)
        check_model(generator.model, group, check_parameters)
        if group is None:
            hint = examples_hint(loader)
            feats = generator.gram_features(loader, hint if hint > 0 else None)
            return cls(generator.gram_symmetric(feats), generator)
        K, layout, info = _gram_rows(generator, loader, group, exchange)
        out = cls(K, generator, group, layout)
        out.exchange_info = info
        return out

    # shape and assembly -------------------------------------------------------------------
    @property
    def local(self) -> Tensor:
        """(c, n_r, c, n): this rank's rows (the whole tensor for one process)."""
        return self.data

    @property
    def c(self) -> int:
        return self.data.shape[0]

    def size(self, dim=None):
        s = torch.Size([self.c, self.layout.n, self.c, self.layout.n])
        return s if dim is None else s[dim]

    def to_torch(self) -> Tensor:
        """The whole (c, n, c, n), on every rank (collective in a group)."""
        if self.group is None:
            return self.data
        from ..dist.exchange import all_gather_rows

        return all_gather_rows(self.data, dim=1, group=self.group)

    def gather(self, dst: Optional[int] = None) -> Optional["FMatDense"]:
        """A one-process FMatDense of the whole tensor: on every rank (``dst=None``) or on
        rank ``dst`` only (``None`` on the others). Collective in a group."""
        if self.group is None:
            return self
        if dst is None:
            return FMatDense(self.to_torch(), self.generator)
        from ..dist.exchange import gather_rows

        full = gather_rows(self.data, dim=1, dst=dst, group=self.group)
        return None if full is None else FMatDense(full, self.generator)

    def save(self, path, **kw) -> str:
        """Write to a zarr v3 store (see :func:`nngeo_dist.store.objects.save`); in a group
        every rank calls it and writes its own rows."""
        from ..store.objects import save

        return save(self, path, **kw)

    def _rows_matrix(self) -> Tensor:
        """(c n_r, c n): this rank's rows of the (c n, c n) matrix, output-major."""
        c = self.c
        return self.data.reshape(c * self.layout.n_local, c * self.layout.n)

    def _matrix(self) -> Tensor:
        return self._rows_matrix()

    # operations -------------------------------------------------------------------------
    def mv(self, v: FVector) -> FVector:
        """K v: an FVector (c, n) for one process, a ShardedFVector in a group (``v``: a
        ShardedFVector of the same layout, or the whole (c, n) FVector on every rank)."""
        x = whole(v, self.layout, self.c)
        y = (self._rows_matrix() @ x.reshape(-1)).reshape(self.c, self.layout.n_local)
        return make_fvector(y, self.group, self.layout)

    def vTMv(self, v: FVector) -> Tensor:
        x = whole(v, self.layout, self.c)
        mine = x[:, self.layout.local_slice()].reshape(-1)
        return group_sum(torch.dot(mine, self._rows_matrix() @ x.reshape(-1)), self.group)

    def _local_diag(self) -> Tensor:
        """(c, n_r): K[a, i, a, offset + i] for this rank's rows."""
        sq = self.data[:, :, :, self.layout.local_slice()]
        c, m = self.c, self.layout.n_local
        return torch.diagonal(sq.reshape(c * m, c * m)).reshape(c, m)

    def trace(self) -> Tensor:
        return group_sum(self._local_diag().sum(), self.group)

    def frobenius_norm(self) -> Tensor:
        return group_sum(sum_of_squares(self.data), self.group).sqrt()

    def get_diag(self) -> Tensor:
        """The diagonal of the (c n, c n) matrix, (c n,) output-major, on every rank."""
        from ..dist.exchange import all_gather_rows

        return all_gather_rows(self._local_diag(), dim=1, group=self.group).reshape(-1)

    def compute_eigendecomposition(self, impl: str = "eigh"):
        """Eigenvalues ascending (c n,), eigenvectors as columns (c n, c n). In a group the
        whole matrix is gathered on rank 0, decomposed there and broadcast, so that every
        rank holds the same bits.

        ``impl`` exists for nngeometry 0.4 code: "eigh" and "svd" are accepted and both
        give this symmetric eigendecomposition (ascending, unlike 0.4's svd order); any
        other value raises ValueError."""
        check_impl("FMatDense", "compute_eigendecomposition", impl, ("eigh", "svd"))
        if self.group is None:
            M = self._matrix()
            self.evals, self.evecs = torch.linalg.eigh((M + M.t()) / 2)
            return self.evals, self.evecs
        from ..dist.errors import collective_errors
        from ..dist.exchange import broadcast_from, gather_rows

        full = gather_rows(self.data, dim=1, dst=0, group=self.group)
        m = self.c * self.layout.n
        evals = evecs = None
        with collective_errors(self.group):  # rank 0 failing must not leave the others waiting
            if full is not None:
                M = full.reshape(m, m)
                evals, evecs = torch.linalg.eigh((M + M.t()) / 2)
        dev, dt = self.data.device, self.data.dtype
        self.evals = broadcast_from(evals, 0, self.group, shape=(m,), dtype=dt, device=dev)
        self.evecs = broadcast_from(evecs, 0, self.group, shape=(m, m), dtype=dt, device=dev)
        return self.evals, self.evecs

    def get_eigendecomposition(self):
        if self.evals is None:
            self.compute_eigendecomposition()
        return self.evals, self.evecs

    # pickling ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything but the generator (not picklable; see
        :func:`~nngeo_dist.object.pspace.base.picklable_state`); refused in a group."""
        return picklable_state(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # algebra ----------------------------------------------------------------------------
    def _same_layout(self, other: "FMatDense") -> None:
        if not isinstance(other, FMatDense):
            raise TypeError(f"cannot combine an FMatDense with {type(other).__name__}")
        if other.layout.counts != self.layout.counts or other.data.shape != self.data.shape:
            raise ValueError(
                f"the two Gram matrices are sharded differently ({list(self.layout.counts)} vs "
                f"{list(other.layout.counts)} examples per rank): build both from the same shards"
            )

    def _new(self, data: Tensor) -> "FMatDense":
        return FMatDense(data, self.generator, self.group, self.layout)

    def __add__(self, other: "FMatDense") -> "FMatDense":
        self._same_layout(other)
        return self._new(self.data + other.data)

    def __sub__(self, other: "FMatDense") -> "FMatDense":
        self._same_layout(other)
        return self._new(self.data - other.data)

    def __rmul__(self, x) -> "FMatDense":
        return self._new(x * self.data)

    __mul__ = __rmul__

    def __repr__(self) -> str:
        c, n = self.c, self.layout.n
        where = "" if self.group is None else f", rows {self.layout.local_slice()} on this rank"
        return f"FMatDense(c={c}, n={n}{where})"
