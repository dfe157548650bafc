"""Data parallel: two gloo processes under torchrun give the numbers one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import _dist_worker
import pytest


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).with_name("_dist_worker.py")),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = _dist_worker.compute()
    assert two["forward_passes"] < one["forward_passes"]  # each rank did only its share of the batches
    for key in ("term", "jvp_term", "loss_change", "second_order"):
        assert two[key] == pytest.approx(one[key], rel=1e-10), key
    assert two["values"] == pytest.approx(one["values"], rel=1e-10)
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-12)
    assert two["per_tensor"].keys() == one["per_tensor"].keys()
    for name, value in one["per_tensor"].items():
        assert two["per_tensor"][name] == pytest.approx(value, rel=1e-9, abs=1e-15), name
