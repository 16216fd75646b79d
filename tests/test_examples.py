"""The examples run as they are, from any directory, and print what they promise."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_fisher_figure1(tmp_path):
    out = run_example("fisher_figure1.py", tmp_path)
    kfac, dense = map(float, re.search(r"v\^T F v\s+KFAC: (\S+)\s+dense: (\S+)", out).groups())
    assert kfac > 0 and dense > 0
    cos = float(re.search(r"cos\(g, F\^-1 g\) = (\S+)", out).group(1))
    assert 0 < cos <= 1  # a damped natural gradient is a descent direction


def test_ntk_kernel_pca_writes_its_figure(tmp_path):
    out = run_example("ntk_kernel_pca.py", tmp_path)
    assert "wrote ntk_kernel_pca.png" in out
    png = tmp_path / "ntk_kernel_pca.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
