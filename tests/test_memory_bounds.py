"""Peak memory of builds and passes against what the README promises.

torch's CPU allocations are invisible to tracemalloc, so each case runs in a fresh
subprocess that resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) after the
setup and reads ``VmHWM`` after the operation: the extra peak is compared with the size of
the buffer that must not be materialised, with a generous margin (a loaded machine adds
noise, not resident memory). Linux only.
"""
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS counter"
)

PRELUDE = r"""
import gc, torch
torch.set_num_threads(1)
torch.manual_seed(0)

def _status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

def extra_peak(op):
    gc.collect()
    base = _status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    op()
    return _status('VmHWM') - base
"""


def _extra_peak(body: str) -> int:
    """Run PRELUDE + ``body`` (which prints ``extra_peak(...)``) in a subprocess; bytes."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak-RSS counter here")
    out = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


def test_ekfac_diagonal_of_a_convolution_never_holds_the_batch_patches():
    """EKFAC's diagonal pass (``update_diag``) builds a convolution's patches chunk by
    chunk, as Diag does: the batch's (N, i', T) patches, 9x its input here, and their
    projection on A's eigenbasis were both held (kfe_inputs)."""
    N, C, H = 32, 16, 64
    patches = N * (C * 9 + 1) * H * H * 4  # 76 MB
    extra = _extra_peak(f"""
from nngeo_dist import FIM
from nngeo_dist.object import PMatEKFAC
model = torch.nn.Sequential(torch.nn.Conv2d({C}, {C}, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear({C}, 2))
x = torch.randn({N}, {C}, {H}, {H})
loader = [(x,)]
F = FIM(model, loader, PMatEKFAC, variant="regression")
print(extra_peak(lambda: F.update_diag(loader)))
""")
    # before: >= 2 x patches (152 MB); now the forward, two outputs' gradients, 2 MB chunks
    assert extra < patches, f"update_diag peaked {extra / 2**20:.0f} MB above its start; the batch's patches are {patches / 2**20:.0f} MB"


def test_backward_route_timing_holds_one_routes_gradients():
    """The first batch times the vectorised backward against one backward per output;
    it kept both routes' gradients (a list of every output's, beside the vectorised
    ones, and the previous round's vectorised ones while making the next): about three
    times the capture's K x activations instead of one."""
    N, W, K = 256, 8192, 32
    capture = K * N * (W + K) * 4  # the (K, N, *out) output gradients of every layer: 270 MB
    extra = _extra_peak(f"""
from nngeo_dist import FIM
from nngeo_dist.object import PMatDiag
model = torch.nn.Sequential(torch.nn.Linear(16, {W}), torch.nn.ReLU(), torch.nn.Linear({W}, {K}))
x = torch.randn({N}, 16)
print(extra_peak(lambda: FIM(model, [(x,)], PMatDiag, variant="regression")))
""")
    # before: ~3.9 x capture (1.05 GB); now ~2.3 x (the backward's own temporaries)
    assert extra < 3.2 * capture, f"the first Diag pass peaked {extra / 2**20:.0f} MB; the capture is {capture / 2**20:.0f} MB"


def test_background_writes_hold_at_most_two_tiles():
    """A tiled job computes tile k+1 while tile k is written: two tiles in memory. The
    queue let a third wait between them (tile k written, k+1 queued, k+2 computed)."""
    from nngeo_dist.store.job import BackgroundWrites

    class Tile:
        pass

    alive = weakref.WeakSet()
    most = 0

    def write(tile):
        time.sleep(0.05)  # a slow disk: the computation runs ahead

    with BackgroundWrites() as writes:
        for _ in range(6):
            tile = Tile()  # "computed"
            alive.add(tile)
            most = max(most, len(alive))
            writes.submit(write, tile)
            del tile
    assert most <= 2, f"{most} tiles were held at once"
    assert threading.active_count() < 50


def test_background_writes_report_a_failed_write():
    from nngeo_dist.store.job import BackgroundWrites

    def fail(_):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWrites() as writes:
            for i in range(4):
                writes.submit(fail, i)


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
