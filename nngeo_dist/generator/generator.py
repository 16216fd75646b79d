"""Model + data -> numbers. One pass over a loader (a shard of the data) per statistic.

Every ``*_statistics`` method returns a :class:`Statistics` of sums over the examples it
saw, with tensors of the right shapes even when the loader is empty (an empty shard on one
rank must still take part in the reduction).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from . import gram
from .capture import Capturer, _check_finite
from .functional import FunctionalModel
from .kfac import StatSpec, _selected, per_output_chunk, run_spec
from .statistics import Statistics

log = logging.getLogger("nngeo_dist.generator")


def _to_device(batch, device) -> tuple:
    if isinstance(batch, Tensor):
        batch = (batch,)
    return tuple(t.to(device) if isinstance(t, Tensor) else t for t in batch)


def batch_examples(batch) -> Optional[int]:
    """The number of examples of a batch as a loader yields it (a tensor, or a sequence
    whose tensors are example-major): the leading dimension of its first tensor with one;
    None when it holds none (then only the forward pass tells)."""
    for t in (batch,) if isinstance(batch, Tensor) else batch:
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


def is_empty_batch(batch) -> bool:
    """Whether a batch holds no example (it must then contribute nothing, as if absent)."""
    return batch_examples(batch) == 0


def as_batches(loader):
    """nngeometry's ``examples``: a tuple of tensors sharing their first dimension, such as
    ``(x, y)``, is ONE batch of those fields (not two batches of one tensor each); a list
    stays a list of batches, anything else is iterated as it is."""
    if (isinstance(loader, tuple) and loader and all(isinstance(t, Tensor) and t.dim() for t in loader)
            and len({t.shape[0] for t in loader}) == 1):
        return [loader]
    return loader


def default_function(model: nn.Module) -> Callable:
    def function(*batch):
        return model(batch[0])

    return function


class Generator:
    """Computes per-example quantities of ``function(*batch) -> (N, K)`` w.r.t. the
    parameters of ``layer_collection`` (all supported layers of ``model`` by default)."""

    def __init__(
        self,
        model: nn.Module,
        function: Optional[Callable] = None,
        layer_collection=None,
        n_output: Optional[int] = None,
        max_outputs: Optional[int] = None,
        progress: Optional[bool] = None,
    ):
        from ..layercollection import LayerCollection

        self.model = model
        self.function = function or default_function(model)
        self.layer_collection = layer_collection or LayerCollection.from_model(model)
        if self.layer_collection.numel() == 0:
            raise ValueError("the layer collection holds no parameter")
        self.n_output = n_output
        self.capturer = Capturer(model, self.function, self.layer_collection, max_outputs)
        self.functional = FunctionalModel(model, self.function, self.layer_collection)
        self.l_to_m = self.capturer.l_to_m
        self.progress = progress
        params = self.layer_collection.parameters(model)
        self.device = params[0].device
        self.dtype = params[0].dtype
        #: whether the function draws random numbers (a Monte-Carlo FIM root), and the
        #: torch.Generator it draws from (None: torch's global one)
        self.random = False
        self.rng: Optional[torch.Generator] = None
        self._rng_snapshot = None
        self._rng_origin = None  # the random state of the first replayed pass

    def restricted_to(self, layer_collection) -> "Generator":
        """The same model and function (and its random draws) on some of the layers."""
        sub = Generator(self.model, self.function, layer_collection=layer_collection,
                        n_output=self.n_output, max_outputs=self.capturer.max_outputs,
                        progress=self.progress)
        sub.random, sub.rng = self.random, self.rng
        return sub

    # iteration ------------------------------------------------------------------------
    def batches(self, loader: Iterable, desc: str = "") -> Iterable[tuple]:
        """Every non-empty batch of ``loader`` as a tuple of tensors on the model's device.

        A batch of 0 examples (see :func:`batch_examples`) is skipped, exactly as if the
        loader had not yielded it: per-layer kernels cannot reshape 0 examples, and it
        adds nothing to any sum. A loader of only such batches is an empty loader."""
        it = loader
        if self.progress or (self.progress is None and _is_rank0()):
            try:
                from tqdm.std import tqdm  # tqdm.auto would iterate the loader twice

                total = len(loader) if hasattr(loader, "__len__") else None
                it = tqdm(loader, desc=desc, total=total, leave=False, disable=None if self.progress is None else not self.progress)
            except ImportError:  # pragma: no cover
                pass
        for batch in it:
            if not is_empty_batch(batch):
                yield _to_device(batch, self.device)

    def _check_n_output(self, K: int) -> None:
        if self.n_output is not None and self.n_output != K:
            raise ValueError(
                f"n_output={self.n_output} but the function returns {K} outputs per example; "
                "drop n_output (it is inferred) or fix the function"
            )

    def _captures(self, loader, desc, stream: bool = True):
        """Yield (ks, Captured) for every batch and output chunk; count examples.
        ``stream``: see :meth:`Capturer.capture` (False: one chunk per batch unless
        ``max_outputs`` says otherwise)."""
        self.last_count = 0
        self.capturer.check_modules()
        for batch in self.batches(loader, desc):
            first = True
            for ks, cap in self.capturer.capture(batch, stream):
                if first:
                    self._check_n_output(cap.k_total)
                    self.last_count += cap.n
                    first = False
                yield ks, cap

    def _layers(self):
        for name, layer in self.layer_collection.layers.items():
            yield name, layer, self.l_to_m[name]

    def _zeros(self, *shape) -> Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _accumulate(self, loader, desc, init: dict, per_batch: Callable, symmetric=()) -> Statistics:
        sums = init
        for ks, cap in self._captures(loader, desc):
            for key, val in per_batch(cap, ks).items():
                sums[key] += val
        return Statistics(sums, self.last_count, frozenset(symmetric))

    # statistics ------------------------------------------------------------------------
    def diag_spec(self, names=None) -> StatSpec:
        """sums: ``diag`` (d_names,) = sum_n sum_k J_k(x_n)^2 over the layers ``names``
        (default: all), in flat order."""
        layers = _selected(self, names)

        def compute(cap, held):
            return {"diag": torch.cat([l.math.diag_held(m, cap.inputs[n], held[n]) for n, l, m in layers])}

        init = {"diag": self._zeros(sum(l.numel() for _, l, _ in layers))}
        return StatSpec(init, per_output_chunk([n for n, _, _ in layers], compute))

    def diag_statistics(self, loader) -> Statistics:
        """sums: ``diag`` (d,) = sum_n sum_k J_k(x_n)^2."""
        return run_spec(self, loader, self.diag_spec(), "diag")

    def functional_diag_statistics(self, loader) -> Statistics:
        """Like :meth:`diag_statistics` through ``torch.func`` per-example Jacobians: slower,
        but exact where per-layer hooks cannot be used (a module called twice, tied weights)."""
        d = self.layer_collection.numel()
        diag = self._zeros(d)
        count = 0
        self.capturer.check_modules()
        for batch in self.batches(loader, "diag (functional)"):
            jac = self.functional.per_example_jacobians(batch)
            diag += torch.cat([(j * j).sum(dim=(0, 1)).reshape(-1) for j in jac]).detach()
            count += jac[0].shape[0]
        return Statistics({"diag": diag}, count)

    def per_example_grads(self, cap, out: Optional[Tensor] = None) -> Tensor:
        """(K, N, d) per-example gradients of one captured batch, in flat order; written
        into ``out`` when given (a view of a larger buffer)."""
        if out is None:
            K, N = cap.out.shape[1], cap.n
            out = torch.empty((K, N, self.layer_collection.numel()), dtype=self.dtype, device=self.device)
        pos = self.layer_collection.p_pos
        for n, layer, mod in self._layers():
            view = out[..., pos[n]:pos[n] + layer.numel()]
            layer.math.per_example_grads_into(mod, cap.inputs[n], cap.grads[n], view)
        return out

    def dense_spec(self, names=None) -> StatSpec:
        """sums: ``dense`` (d_names, d_names) = sum_n J_n^T J_n over the layers ``names``."""
        layers = _selected(self, names)
        if len(layers) == len(self.layer_collection.layers):
            def grads(cap):  # every layer: written in flat order into one buffer
                return self.per_example_grads(cap)
        else:
            def grads(cap):
                return torch.cat([l.math.per_example_grads(m, cap.inputs[n], cap.grads[n]) for n, l, m in layers], dim=-1)
        d = sum(l.numel() for _, l, _ in layers)

        def per_batch(cap, ks):
            pg = grads(cap).flatten(0, 1)
            return {"dense": pg.t() @ pg}

        return StatSpec({"dense": self._zeros(d, d)}, per_batch, frozenset(["dense"]))

    def dense_statistics(self, loader) -> Statistics:
        """sums: ``dense`` (d, d) = sum_n J_n^T J_n."""
        return run_spec(self, loader, self.dense_spec(), "dense")

    def block_spec(self, names=None) -> StatSpec:
        """sums: ``block/<layer>`` (d_l, d_l) for the layers ``names`` (default: all)."""
        layers = _selected(self, names)
        init = {f"block/{n}": self._zeros(l.numel(), l.numel()) for n, l, _ in layers}

        def per_batch(cap, ks):
            return {f"block/{n}": l.math.block(m, cap.inputs[n], cap.grads[n]) for n, l, m in layers}

        return StatSpec(init, per_batch, frozenset(init))

    def block_statistics(self, loader) -> Statistics:
        """sums: ``block/<layer>`` (d_l, d_l) per layer."""
        return run_spec(self, loader, self.block_spec(), "blocks")

    def trace_statistics(self, loader) -> Statistics:
        """sums: ``trace`` () = sum_n ||J_n||_F^2."""

        def per_batch(cap, ks):
            return {"trace": sum(layer.math.trace(mod, cap.inputs[n], cap.grads[n]) for n, layer, mod in self._layers())}

        return self._accumulate(loader, "trace", {"trace": self._zeros()}, per_batch)

    def jacobian_rows(self, loader) -> tuple[Tensor, int]:
        """(K, n, d) per-example Jacobians of the loader's examples, and n.

        When the loader tells its length, every batch is written in place into one
        (K, n, d) buffer; otherwise batches are concatenated at the end."""
        d = self.layer_collection.numel()
        n_expected = _expected_examples(loader)
        buffer, parts, offset = None, [], 0
        for ks, cap in self._captures(loader, "jacobian"):
            if buffer is None and n_expected is not None and not parts:
                buffer = torch.empty((cap.k_total, n_expected, d), dtype=self.dtype, device=self.device)
            if buffer is not None and offset + cap.n > buffer.shape[1]:  # the loader lied
                parts, buffer = [buffer[:, :offset]], None
            if buffer is not None:
                self.per_example_grads(cap, out=buffer[ks.start:ks.stop, offset:offset + cap.n])
            else:
                if ks.start == 0:
                    parts.append(torch.empty((cap.k_total, cap.n, d), dtype=self.dtype, device=self.device))
                self.per_example_grads(cap, out=parts[-1][ks.start:ks.stop])
            if ks.stop == cap.k_total:
                offset += cap.n
        if buffer is not None:
            return buffer[:, :offset], self.last_count
        if not parts:
            return self._zeros(self.n_output or 0, 0, d), 0
        return torch.cat(parts, dim=1), self.last_count

    # Gram ------------------------------------------------------------------------------
    def gram_features(self, loader, n_total: Optional[int] = None) -> list:
        """Per batch: (N, {layer: features}) for :meth:`gram_block` (outputs not chunked)."""
        feats = []
        if n_total is None:  # one choice of features per layer for every batch
            n_total = len(getattr(loader, "dataset", ())) or None
        for ks, cap in self._captures(loader, "gram features", stream=False):
            n_total = n_total or cap.n
            f = {n: layer.math.gram_features(mod, cap.inputs[n], cap.grads[n], n_total) for n, layer, mod in self._layers()}
            if ks.start == 0:
                feats.append((cap.n, [f]))
            else:
                feats[-1][1].append(f)
        return feats

    def gram_block(self, rows: list, cols: list, out: Optional[Tensor] = None) -> Tensor:
        """(K, n1, K, n2) Gram block between the examples of two lists of per-batch
        features (:meth:`gram_features`), into ``out`` when given."""
        return gram.block(self._gram_maths(), rows, cols, out)

    def gram_symmetric(self, feats: list, out: Optional[Tensor] = None) -> Tensor:
        """(K, n, K, n) Gram of the examples of per-batch features with themselves (about
        half the products of a plain block; see :func:`gram.symmetric`), into ``out``
        when given."""
        return gram.symmetric(self._gram_maths(), feats, out)

    def _gram_maths(self) -> dict:
        return {n: layer.math for n, layer in self.layer_collection.layers.items()}

    # functional (implicit) ------------------------------------------------------------
    def jvp_batches(self, loader, v_tensors: Sequence[Tensor]):
        """Yield (batch, f (N, K), J v (N, K)) for each batch."""
        v_tensors = self.functional.as_tangents(self._project_tangents(v_tensors))
        self.capturer.check_modules()
        for batch in self.batches(loader, "J v"):
            self._rng_snapshot = self._rng_state()
            out, jv = self.functional.jvp(batch, v_tensors)
            _check_finite(out)
            if not torch.isfinite(jv).all():
                raise FloatingPointError(
                    "J v contains NaN or Inf although the outputs are finite: some gradients "
                    "are not finite (e.g. an Inf input that the network saturates); check the data"
                )
            self._check_n_output(out.shape[1])
            yield batch, out, jv

    def _project_tangents(self, tangents: Sequence[Tensor]) -> list:
        out, it = [], iter(tangents)
        for name, layer, mod in self._layers():
            out.append(layer.math.project_tangent(mod, next(it)))
            if layer.has_bias:
                out.append(next(it))
        return out

    def _rng_state(self):
        if self.rng is not None:
            return ("gen", self.rng.get_state())
        if self.device.type == "cuda":
            return ("cuda", torch.cuda.get_rng_state(self.device))
        return ("cpu", torch.get_rng_state())

    def _restore_rng(self, snapshot) -> None:
        kind, state = snapshot
        if kind == "gen":
            self.rng.set_state(state)
        elif kind == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def replaying_draws(self) -> Iterator[None]:
        """A pass over the data inside this context draws what the first such pass drew.

        A random function (a Monte-Carlo FIM root) stands for ONE sampled matrix, so an
        object that passes over the data once per operation (PMatImplicit: every mv,
        vTMv, trace and CG step) must replay the same draws each time. The first pass
        draws as usual; a later one starts from the random state the first started from,
        and afterwards the random state is put back, so that torch's global generator
        (used when no seed was given) advances once, not once per operation. A function
        that draws nothing needs no replay."""
        if not self.random:
            yield
            return
        if self._rng_origin is None:
            self._rng_origin = self._rng_state()
            yield
            return
        before = self._rng_state()
        self._restore_rng(self._rng_origin)
        try:
            yield
        finally:
            self._restore_rng(before)

    def vjp(self, batch, u: Tensor) -> list[Tensor]:
        """J^T u for the batch last seen by :meth:`jvp_batches`; a random function (a
        Monte-Carlo FIM root) replays the draws of that forward-mode pass."""
        if self._rng_snapshot is not None:
            self._restore_rng(self._rng_snapshot)
        grads = self.functional.vjp(batch, u)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.functional.params)]


def _expected_examples(loader) -> Optional[int]:
    """How many examples a DataLoader will yield, when it can tell (else None)."""
    try:
        if getattr(loader, "drop_last", False):
            return None
        sampler = getattr(loader, "sampler", None)
        return len(sampler) if sampler is not None else None
    except TypeError:
        return None


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
