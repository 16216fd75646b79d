"""The helpers a user calls: FIM, FIM_MonteCarlo, GramMatrix, Jacobian.

They build a :class:`Generator` for the right function and hand it to the
representation's ``build`` (statistics -> reduce -> finalise).
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import Callable, Optional

import torch
from torch import nn

from .generator import Generator, as_batches, default_function, is_empty_batch, no_example_error
from .generator.variants import fim_root, monte_carlo_root
from .object import FMatDense, PushForwardDense


def _generator(model, function, layer_collection, n_output, **kw) -> Generator:
    return Generator(model, function, layer_collection=layer_collection, n_output=n_output, **kw)


def _check_call(model, n_output, kw: dict) -> None:
    """Arguments code written for nngeometry 0.4 passes: ``device=`` (its batches go
    there; here they go to the model's device, so it must be that one, and is dropped),
    and a positional 4th argument, which is ``n_output`` here."""
    if n_output is not None and (isinstance(n_output, bool) or not _is_whole(n_output)):
        raise TypeError(
            f"n_output={n_output!r} is not a number of outputs: the 4th positional argument is "
            "n_output here (nngeometry 0.4 had variant there for FIM, representation for "
            "GramMatrix and Jacobian): pass the other arguments by keyword"
        )
    if "device" in kw:
        device = torch.device(kw.pop("device"))
        params = next(iter(model.parameters()), None)
        here = params.device if params is not None else torch.device("cpu")
        if device.type != here.type or (device.index is not None and device.index != here.index):
            raise ValueError(
                f"device={device} but the model is on {here}: batches go to the model's device; "
                "move the model there (model.to(device)) or drop device="
            )


def _is_whole(x) -> bool:
    """An int, numpy integer or integer 0-d tensor (what operator.index accepts)."""
    try:
        operator.index(x)
        return True
    except TypeError:
        return False


def _check_loader(loader, group=None) -> None:
    """An empty loader is an error for one process; in a group a rank may hold no example
    (the global count is checked after the reduction, on every rank alike)."""
    from .object.groupops import resolved_group

    if resolved_group(group) is not None:
        return
    try:
        if len(loader) == 0:
            raise no_example_error()
    except TypeError:  # an iterable without len
        pass


def _check_model(model, group, check_parameters: bool) -> None:
    """In a group of more than one rank, with ``check_parameters``: every rank's model must
    have the same parameters and buffers (the same RuntimeError on every rank if not)."""
    from .object.groupops import check_model, effective_group

    check_model(model, effective_group(group), check_parameters)


def _checked(build, kw: dict) -> dict:
    """``kw`` for ``build``: the model was compared across ranks already (_check_model), so
    a build that can compare it itself is told not to do it again."""
    import inspect

    if "check_parameters" in inspect.signature(build).parameters:
        return {**kw, "check_parameters": False}
    return kw


def _build(representation, generator, loader, group, **kw):
    if isinstance(representation, dict):  # one representation per layer type / name
        from .object.pspace.mixed import PMatMixed

        return PMatMixed.build(generator, loader, group=group, mapping=representation, **kw)
    return representation.build(generator, loader, group=group, **_checked(representation.build, kw))


def FIM(
    model: nn.Module,
    loader,
    representation,
    n_output: Optional[int] = None,
    variant: str = "classif_logits",
    function: Optional[Callable] = None,
    layer_collection=None,
    group=None,
    store=None,
    check_parameters: bool = True,
    **kw,
):
    """The Fisher Information Matrix of ``model`` over ``loader`` in ``representation``.

    ``function(*batch) -> (batch, c)`` defaults to ``model(batch[0])``; ``variant`` is one
    of classif_logits, classif_binary_logits, regression (DESIGN.md §1). ``representation``
    is a PMat class or a mapping layer type/name -> class (mixed). ``group``: a process
    group (default: the world group when initialised); each rank passes its own shard.
    """
    loader = as_batches(loader)
    _check_loader(loader, group)
    _check_model(model, group, check_parameters)
    _check_call(model, n_output, kw)
    root = fim_root(function or default_function(model), variant)
    gen = _generator(model, root, layer_collection, None, **_gen_kw(kw))
    loader = _check_n_output_matches(gen, n_output, model, function, loader, group)
    if store is not None:
        from .object import PMatLowRank
        from .object.stored import PMatLowRankStored

        if representation is PMatLowRank:
            representation = PMatLowRankStored
        if representation is not PMatLowRankStored:
            name = getattr(representation, "__name__", "a mapping of representations")
            raise TypeError(
                f"store= streams per-example Jacobians to a zarr store, which only PMatLowRank "
                f"is built from; {name} is computed in memory: drop store= (and save the "
                "result with .save(path) if it should be kept)"
            )
        kw.update(variant=variant, user_function=function)  # recorded in the store's fingerprint
        kw["store"] = store
    return _build(representation, gen, loader, group, **kw)


def FIM_MonteCarlo(
    model: nn.Module,
    loader,
    representation,
    n_output: Optional[int] = None,
    variant: str = "classif_logits",
    trials: int = 1,
    function: Optional[Callable] = None,
    layer_collection=None,
    group=None,
    seed: Optional[int] = None,
    check_parameters: bool = True,
    **kw,
):
    """Monte-Carlo FIM: ``trials`` draws y ~ p(y|x) per example (classif_logits,
    regression). With ``seed``, draws are reproducible; each rank of a group draws from its
    own stream derived from the seed and its rank."""
    loader = as_batches(loader)
    _check_loader(loader, group)
    _check_model(model, group, check_parameters)
    _check_call(model, n_output, kw)
    params = next(iter(model.parameters()))
    rng = None
    if seed is not None:
        from .object.groupops import resolved_group
        from .dist.group import rank as _rank

        rng = torch.Generator(device=params.device)
        rng.manual_seed(int(seed) + 1_000_003 * _rank(resolved_group(group)))
    root = monte_carlo_root(function or default_function(model), variant, trials, rng)
    gen = _generator(model, root, layer_collection, None, **_gen_kw(kw))
    gen.random, gen.rng = True, rng
    loader = _check_n_output_matches(gen, n_output, model, function, loader, group)
    return _build(representation, gen, loader, group, **kw)


def GramMatrix(
    model: nn.Module,
    loader,
    function: Optional[Callable] = None,
    n_output: Optional[int] = None,
    layer_collection=None,
    representation=FMatDense,
    group=None,
    store=None,
    check_parameters: bool = True,
    **kw,
):
    """The NTK Gram tensor K[a, i, b, j] = J_a(x_i) . J_b(x_j), (c, n, c, n).

    ``outputs=``: a list of output indices, or ``("diff", c1, c2)`` for f_c2 - f_c1.
    ``store=path`` (with ``tile=B``): computed tile by tile into a zarr store, returned as
    a store-backed FMatStored (see nngeo_dist.object.stored)."""
    loader = as_batches(loader)
    _check_loader(loader, group)
    _check_model(model, group, check_parameters)
    _check_call(model, n_output, kw)
    function = _select_outputs(model, function, kw)
    gen = _generator(model, function, layer_collection, n_output, **_gen_kw(kw))
    if store is not None:
        if representation is FMatDense:
            from .object.stored import FMatStored

            representation = FMatStored
        kw["store"] = store
    return representation.build(gen, loader, group=group, **_checked(representation.build, kw))


def Jacobian(
    model: nn.Module,
    loader,
    function: Optional[Callable] = None,
    n_output: Optional[int] = None,
    layer_collection=None,
    representation=PushForwardDense,
    group=None,
    store=None,
    check_parameters: bool = True,
    **kw,
):
    """The Jacobian J (c, n, d) as a push-forward (PushForwardDense by default); with
    ``store=path`` written in chunks (c, B, D0) to a zarr store (PushForwardStored)."""
    loader = as_batches(loader)
    _check_loader(loader, group)
    _check_model(model, group, check_parameters)
    _check_call(model, n_output, kw)
    function = _select_outputs(model, function, kw)
    gen = _generator(model, function, layer_collection, n_output, **_gen_kw(kw))
    if store is not None:
        from .object import PullBackDense
        from .object.stored import PullBackStored, PushForwardStored

        if representation is PushForwardDense:
            representation = PushForwardStored
        elif representation is PullBackDense:
            representation = PullBackStored
        kw["store"] = store
    return representation.build(gen, loader, group=group, **_checked(representation.build, kw))


_GEN_KEYS = ("max_outputs", "progress")


def _select_outputs(model, function, kw: dict):
    """``function`` restricted to ``kw.pop("outputs")`` (a list of indices, or
    ("diff", c1, c2) for f_c2 - f_c1); unchanged without ``outputs``."""
    outputs = kw.pop("outputs", None)
    if outputs is None:
        return function
    from .store.job import select_outputs

    return select_outputs(function or default_function(model), outputs)


def _gen_kw(kw: dict) -> dict:
    return {k: kw.pop(k) for k in _GEN_KEYS if k in kw}


def _check_n_output_matches(gen, n_output, model, function, loader, group=None):
    """``n_output`` describes the model's outputs (c), not the FIM root's: checked on the
    first non-empty batch of the wrapped function. Returns the loader to compute from: a
    one-shot iterator comes back with the batches the check drew put back in front.

    In a group every rank takes part in one all_gather of what it saw (an empty shard
    sees nothing), so a wrong ``n_output`` or a failing batch on one rank raises on every
    rank at once, naming it, instead of leaving the others waiting in the next collective."""
    from .object.groupops import agree_ints, effective_group

    if n_output is None:
        return loader
    drawn, it = [], iter(loader)
    c, error = -1, None  # -1: an empty shard of a group (one process: the build raises)
    try:
        for b in it:
            drawn.append(b)
            if not is_empty_batch(b):
                c = _outputs_per_example(gen, model, function, b)
                break
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree_ints
        error = exc
    loader = itertools.chain(drawn, it) if isinstance(loader, Iterator) else loader
    seen = {r[0] for r in agree_ints([c], error, effective_group(group))} - {-1}
    wrong = sorted(k for k in seen if k != n_output)
    if wrong:
        raise ValueError(
            f"n_output={n_output} but the model returns {wrong[0]} outputs per example; drop "
            "n_output (it is inferred) or fix the model/function"
        )
    return loader


def _outputs_per_example(gen, model, function, batch) -> int:
    batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    batch = tuple(t.to(gen.device) if isinstance(t, torch.Tensor) else t for t in batch)
    with torch.no_grad():
        out = (function or default_function(model))(*batch)
    return 1 if out.dim() == 1 else out.shape[1]
