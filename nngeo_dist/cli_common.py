"""What the command lines (``fim``, ``ntk``) share: the model, the data, the process group.

Models are given as an import path ``pkg.mod:factory`` (called with JSON keyword
arguments, optionally followed by loading a state dict), data sets as a built-in name
(``digits``, ``synthetic``) or an import path to a factory returning a map-style Dataset.
With no argument, both run on the embedded default: a small MLP trained for a few
seconds on scikit-learn's bundled digits (real data, no download).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .dist.errors import raised_on_every_rank

log = logging.getLogger("nngeo_dist.cli")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# built-in data and model ---------------------------------------------------------------
def digits_dataset(dtype=torch.float32) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits (1797 examples, 64 features, 10 classes), standardised."""
    x, y = _digits_arrays()
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return TensorDataset(x.to(dtype), torch.tensor(y, dtype=torch.long))


def _digits_arrays():
    """(x (1797, 64), y (1797,)) of scikit-learn's bundled digits, read straight from its data
    file (importing scikit-learn takes seconds); load_digits when the file is not found."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def synthetic_dataset(n: int = 2048, features: int = 64, classes: int = 10, seed: int = 0, dtype=torch.float32) -> TensorDataset:
    """Gaussian inputs with labels from a random linear teacher (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    w = torch.randn(features, classes, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x.to(dtype), y)


def digits_mlp(hidden: int = 32, train_steps: int = 200, seed: int = 0) -> nn.Module:
    """MLP 64-hidden-hidden-10 (tanh), trained full-batch with Adam on digits (seconds)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    if train_steps:
        x, y = digits_dataset().tensors
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a busy machine
        try:
            for _ in range(train_steps):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
    return model.eval()


BUILTIN_MODELS = {"digits_mlp": digits_mlp}
BUILTIN_DATA = {"digits": digits_dataset, "synthetic": synthetic_dataset}


def _import(path: str):
    if ":" not in path:
        raise ValueError(f"'{path}' is not an import path: write it as package.module:name")
    mod, name = path.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import '{path}': {e}") from e


def _read_kwargs(kwargs_json: Optional[str]) -> tuple[Optional[dict], str]:
    """(the keyword arguments of a JSON object, "") or (None, what is wrong with the text)."""
    example = 'write a JSON object such as \'{"depth": 18}\' (keys in double quotes)'
    try:
        kwargs = json.loads(kwargs_json or "{}")
    except json.JSONDecodeError as e:
        return None, f"{kwargs_json!r} is not valid JSON ({e}); {example}"
    if not isinstance(kwargs, dict):
        return None, f"{kwargs_json!r} is a JSON {type(kwargs).__name__}, not an object; {example}"
    return kwargs, ""


def parse_kwargs(kwargs_json: Optional[str], option: str) -> dict:
    """The keyword arguments a JSON object gives (``{}`` for an empty string or None);
    ValueError naming ``option`` (e.g. ``--model-kwargs``) when it is not one."""
    kwargs, problem = _read_kwargs(kwargs_json)
    if kwargs is None:
        raise ValueError(f"{option} {problem}")
    return kwargs


def load_model(spec: str, kwargs_json: str = "{}", weights: Optional[str] = None, device=None, dtype=torch.float32) -> nn.Module:
    """Build the model from ``spec`` (built-in name or ``pkg.mod:factory``), load
    ``weights`` (a state dict saved with torch.save) and put it in eval mode."""
    kwargs = parse_kwargs(kwargs_json, "--model-kwargs")
    factory = BUILTIN_MODELS.get(spec) or _import(spec)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device=device, dtype=dtype).eval()


def load_data(spec: str, kwargs_json: str = "{}", dtype=torch.float32) -> Dataset:
    """The data set ``spec`` names (built-in name or ``pkg.mod:factory``), built with the
    JSON keyword arguments ``kwargs_json``."""
    kwargs = parse_kwargs(kwargs_json, "--data-kwargs")
    if spec in BUILTIN_DATA:
        return BUILTIN_DATA[spec](dtype=dtype, **kwargs)
    ds = _import(spec)(**kwargs)
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise TypeError(f"'{spec}' returned {type(ds).__name__}: a map-style Dataset (__len__, __getitem__) is needed")
    return ds


def positive_int(what: str, hint: str = "") -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= 1, else the option's error names ``what``
    (then ``hint``, if given)."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: must be a positive whole number of {what}{hint}")
        return value

    convert.__name__ = "positive_int"
    return convert


def json_kwargs(text: str) -> str:
    """An argparse ``type``: checks that the text is a JSON object and returns the text
    itself (load_model / load_data parse it), so that bad JSON stops the command before
    any process group is joined, with argparse naming the option."""
    kwargs, problem = _read_kwargs(text)
    if kwargs is None:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_common_args(p: argparse.ArgumentParser, default_out: str, resume_help: str) -> None:
    """The options both commands take; ``resume_help`` says what ``--resume`` does there."""
    p.add_argument("--model", default="digits_mlp", help="built-in name or pkg.mod:factory (default: digits_mlp)")
    p.add_argument("--model-kwargs", default="{}", type=json_kwargs,
                   help="JSON keyword arguments for the model factory")
    p.add_argument("--weights", default=None, help="state dict file (torch.save) to load into the model")
    p.add_argument("--data", default="digits", help="digits, synthetic, or pkg.mod:factory returning a Dataset")
    p.add_argument("--data-kwargs", default="{}", type=json_kwargs,
                   help="JSON keyword arguments for the data factory")
    p.add_argument("--batch-size", type=positive_int("examples"), default=128,
                   help="examples per batch and rank (default: 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", default=default_out, help=f"output zarr store (default: {default_out})")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a stalled collective fails")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                   help="logging level (default: WARNING; DEBUG also logs the bytes of each reduction)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


class _TypedCollate:
    """default_collate, then floating-point tensors cast to ``dtype`` (picklable)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, items):
        from torch.utils.data import default_collate

        batch = default_collate(items)
        return _cast(batch, self.dtype)


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def typed_collate(dtype) -> _TypedCollate:
    """A collate_fn whose floating-point tensors arrive in ``dtype`` (the model's)."""
    return _TypedCollate(dtype)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message (newlines folded), or its type name."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def run_main(main: Callable, argv: Optional[Sequence[str]] = None, error_status: int = 1) -> int:
    """Run a command's ``main(argv)``: exit status 0, or ``error_status`` with one
    ``error: ...`` line on stderr (the traceback too at DEBUG level); 130 if interrupted.
    Then leave the process group, if any (see :func:`leave_group`)."""
    together = False  # whether every rank ends here at the same point
    try:
        main(argv)
        together = True
        return 0
    except KeyboardInterrupt:
        report_error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the command line reports every failure in one line
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        report_error(one_line(e))
        together = raised_on_every_rank(e)
        return error_status
    finally:
        leave_group(barrier=together)


def leave_group(barrier: bool) -> None:
    """Leave the process group. After a success, or an error every rank raised together,
    every rank first waits for the others, so that no rank closes its connections (or
    exits, and has torchrun stop the others) while another still works or reports."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def report_error(text: str) -> None:
    """``error: <text>`` on stderr in one write, so that the lines of ranks reporting at
    the same moment do not interleave."""
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


_LOG_FACTORY_INSTALLED = False


def setup_logging(level: str) -> None:
    """Root logging at ``level``; every record carries this process's rank (env RANK)."""
    global _LOG_FACTORY_INSTALLED
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s [rank %(rank)s] %(message)s")
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))
    if _LOG_FACTORY_INSTALLED:
        return
    rank = os.environ.get("RANK", "0")
    old = logging.getLogRecordFactory()

    def factory(*a, **kw):
        rec = old(*a, **kw)
        rec.rank = rank
        return rec

    logging.setLogRecordFactory(factory)
    _LOG_FACTORY_INSTALLED = True


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def print_summary(summary: dict[str, Any], rank: int) -> None:
    if rank == 0:
        print(json.dumps(summary, indent=None, sort_keys=True), flush=True)
