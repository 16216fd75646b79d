"""Regression tests for defects found reviewing the nngeometry-0.4 / memory / precision
changes (82193a0..HEAD)."""
from __future__ import annotations

import pytest
import torch

from nngeo_dist.object.sums import l2_norm, sum_of_squares


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_half_precision_norm_neither_overflows_nor_loses_precision(dtype, contiguous):
    # entries of 300: their squares (9e4) overflow float16 (max 65504) though the norm
    # (~1643) does not; torch's norm accumulates in float32
    t = torch.full((30, 3), 300.0, dtype=dtype)
    if not contiguous:
        t = t.t()
    ref = torch.linalg.vector_norm(t.double())
    got = l2_norm(t)
    assert got.dtype == dtype
    assert torch.isfinite(got)
    assert abs(got.double() - ref) <= 2 * torch.finfo(dtype).eps * ref



def test_background_writes_slot_released_when_submit_reports_a_failed_write():
    """A submit that waited for the slot of a write that failed re-raises its error; the
    slot it took must go back, else the next submit (after handling the error, e.g. a
    retry) waits forever."""
    import threading
    import time

    from nngeo_dist.store.job import BackgroundWrites

    def bad():
        time.sleep(0.05)
        raise OSError("disk full")

    done = []
    w = BackgroundWrites(depth=1)
    w.submit(bad)
    with pytest.raises(OSError):
        w.submit(done.append, 1)  # waits for bad's slot, then reports its failure
    t = threading.Thread(target=lambda: (w.submit(done.append, 2), w.join()), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "submit after a reported failure hangs: its slot was never released"
    assert done == [2]
