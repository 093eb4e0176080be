"""Helpers for multi-process tests: run `tests/dist/run_layout.py` under torchrun (gloo on a CPU machine; NCCL
where CUDA is available, see `parallel/state.init_distributed`) and as a single-process reference, and compare
losses and parameters.

Why the parity runs are float64 (`PARITY_DTYPE`, default float64): a parallel layout sums the same numbers in
another order (TP all-reduces, DP bucket averages, pipeline-split backward). In float32 that moves a result by
~1e-7 relative, and training amplifies it: AdamW's first steps on a weight are ~lr * g / |g|, so a gradient
that nearly cancels (|g| near the rounding noise) can move by up to ~lr per step, and a discontinuous decision
(an FP8 rounding bucket, MST's top-k near-ties) can flip. How far that goes depends on the CPU's kernels, so a
float32 tolerance is a fact about one machine. In float64 the same reordering moves values by ~1e-16 relative:
even a gradient that cancels to 1e-9 of its terms keeps ~1e-7 relative accuracy, so AdamW's update differs by
< 1e-9 lr and a bucket or tie flips with negligible probability. The 1e-5 tolerances below are then ~1e5 times
the worst rounding effect, and a difference above them is a bug in the parallel logic, not rounding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "dist" / "run_layout.py"

# A tiny LLaMA-ish model: 4 layers so PP2 x VPP2 works, GQA so query groups split over TP2.
TINY_FLAGS = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "16", "--max-position-embeddings", "16",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--vocab-size", "200", "--mock-data",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5", "--lr", "1e-3",
    "--lr-warmup-iters", "0", "--eval-iters", "0", "--log-interval", "100", "--seed", "7",
    "--clip-grad", "0.05",  # every step clips, so parity also checks the global grad norm
]

# A tiny GPT-2-shaped model: LayerNorm, GELU, learned positions, biases, tied embeddings.
GPT_TINY_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
    "--max-position-embeddings", "32", "--position-embedding-type", "learned_absolute", "--normalization", "LayerNorm",
    "--vocab-size", "200", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5",
    "--lr", "1e-3", "--lr-warmup-iters", "0", "--eval-iters", "0", "--log-interval", "100", "--seed", "7",
    "--clip-grad", "0.05",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(out: Path, flags: list[str], nproc: int = 1, timeout: int = 300, torchrun: bool = False,
               dtype: str = "float64") -> dict:
    """Train under `flags` with `nproc` processes (one process runs without torchrun unless `torchrun`) in
    `dtype` (float64 by default, see the module docstring); returns {"losses", "params", ...}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PARITY_DTYPE": dtype}
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, str(HARNESS), str(out), "--", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HARNESS), str(out), "--", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def assert_same_run(run: dict, reference: dict, loss_rtol: float = 1e-5, param_atol: float = 1e-5) -> None:
    assert len(run["losses"]) == len(reference["losses"])
    for i, (a, b) in enumerate(zip(run["losses"], reference["losses"])):
        assert abs(a - b) <= loss_rtol * abs(b), f"iteration {i + 1}: loss {a} vs reference {b}"
    assert run["params"].keys() == reference["params"].keys()
    for name, ref in reference["params"].items():
        got = run["params"][name]
        assert got.shape == ref.shape, f"{name}: {tuple(got.shape)} vs {tuple(ref.shape)}"
        diff = (got - ref).abs().max().item()
        assert diff <= param_atol, f"{name}: max abs diff {diff}"
