"""Two torchrun launchers as two "nodes" (c10d rendezvous on localhost, 2 processes each, tp2 x dp2 with
the distributed optimizer) reproduce the single-process run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.dist_utils import HARNESS, ROOT, TINY_FLAGS, assert_same_run, free_port

pytestmark = pytest.mark.slow


def test_two_nodes_match_single_process(tmp_path, llama_reference):
    out = tmp_path / "two_nodes.pt"
    flags = [*TINY_FLAGS, "--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--overlap-grad-reduce"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = free_port()
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "multinode-test", str(HARNESS), str(out), "--", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    logs = []
    try:
        for launcher in launchers:
            logs.append(launcher.communicate(timeout=300)[0])
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for node, (launcher, log) in enumerate(zip(launchers, logs)):
        assert launcher.returncode == 0, f"node {node} failed:\n{log[-6000:]}"
    assert_same_run(torch.load(out, weights_only=False), llama_reference)
