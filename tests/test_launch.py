"""launch/slurm_fim.sbatch run on this machine: a stand-in ``srun`` (runs its command once,
as SLURM would on a one-node job) and ``scontrol``, SLURM variables describing one node with
two tasks; the job must produce a store equal to a one-process run. (launch/local.sh is
run by test_cli_fim.py::test_user_model_and_data_by_import_path.)"""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nngeo_dist import load
from nngeo_dist.store.objects import read_attrs
from test_cli_fim import REPO, USER, run_here, subprocess_env, summary_of

SRUN = """#!/bin/bash
# stand-in srun: drop srun's own options (--opt=value), run the command once
echo "srun $*" >> "$(dirname "$0")/srun.log"
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
exec "$@"
"""

SCONTROL = """#!/bin/bash
# stand-in scontrol: 'scontrol show hostnames LIST' prints one host per line
if [ "$1 $2" = "show hostnames" ]; then echo "$3" | tr ',' '\\n'; exit 0; fi
echo "stand-in scontrol: unsupported: $*" >&2; exit 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_scripts_parse():
    for name in ("local.sh", "slurm_fim.sbatch"):
        subprocess.run(["bash", "-n", str(REPO / "launch" / name)], check=True)


@pytest.mark.parametrize("visible, nproc", [(None, "4"), ("0,2", "2"), ("3", "1"), ("", "2"), ("-1", "2")])
def test_local_script_counts_the_visible_gpus(tmp_path, visible, nproc):
    """One process per GPU this job may use: CUDA_VISIBLE_DEVICES when set (nvidia-smi
    lists every GPU of the node, here 4), else nvidia-smi's list; none: 2 (CPU)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "nvidia-smi", "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: Fake (UUID: GPU-$i)\"; done\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "CUDA_VISIBLE_DEVICES")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHON": "echo"})
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    proc = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "--repr", "kfac"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"--nproc_per_node={nproc} " in proc.stdout and proc.stdout.rstrip().endswith("--repr kfac"), proc.stdout


@pytest.mark.dist
def test_sbatch_script_one_node_two_tasks(tmp_path, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "srun", SRUN)
    _script(bin_dir / "scontrol", SCONTROL)
    env = subprocess_env()
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "nngeo-fim", "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(tmp_path),
        "MASTER_PORT": str(_free_port()),  # a free port instead of the job-id-derived one
    })
    env.pop("SLURM_GPUS_ON_NODE", None)
    out = tmp_path / "job.zarr"
    args = USER + ["--repr", "diag", "--dtype", "float64", "--out", str(out)]
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm_fim.sbatch"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    s = summary_of(proc.stdout)
    assert s["world_size"] == 2 and s["resumed"] is False
    srun_log = (bin_dir / "srun.log").read_text()
    for flag in ("--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:",
                 "--rdzv_id=4242", "--resume"):
        assert flag in srun_log, srun_log
    assert read_attrs(out)["complete"] is True

    rc, one, err = run_here(args[:-1] + [str(tmp_path / "one.zarr")], capsys)
    assert rc == 0, err
    torch.testing.assert_close(load(str(out)).data, load(str(tmp_path / "one.zarr")).data, rtol=1e-10, atol=1e-14)
