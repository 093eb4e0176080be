"""GPU smoke tests, skipped without CUDA (CI has no GPU): on one GPU, the training loop with BF16 and
validation, the same run as on the CPU, MST, real FP8 GEMMs (`--fp8-gemm scaled_mm`), `tools/generate.py
--device cuda`, and a one-process torchrun run on NCCL. Run them on a GPU machine:

    pytest -q tests/test_gpu.py
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.training import trainer as trainer_lib
from tests.dist_utils import ROOT, TINY_FLAGS, assert_same_run, run_layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["--model-preset", "llama-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--lr", "1e-3", "--lr-warmup-iters", "0",
        "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "2"]


@pytest.fixture(autouse=True)
def on_cuda(monkeypatch):
    """The rest of the suite pins runs to the CPU (tests/conftest.py); these run where the GPU is."""
    monkeypatch.setenv("MEGATRON_EFF_DEVICE", "cuda")


def pretrain(monkeypatch, flags, device: torch.device | None = None):
    """A `Trainer` run in this process; returns (RunResult, model chunks, methods). `device` overrides the
    run's device (the CPU reference on a GPU machine)."""
    if device is not None:
        monkeypatch.setattr(trainer_lib, "device_for_run", lambda: device)
    trainer = trainer_lib.Trainer(config_from_args(parse_args(flags)))
    return trainer.train(), trainer.model, trainer.methods


def assert_trained_on_gpu(result, model, iterations: int) -> None:
    assert len(result.losses) == iterations
    assert all(math.isfinite(loss) for loss in result.losses), result.losses
    for chunk in model:
        for name, tensor in [*chunk.named_parameters(), *chunk.named_buffers()]:
            assert tensor.is_cuda, f"{name} is on {tensor.device}"


def test_bf16_training_with_validation_then_generate_on_gpu(monkeypatch, tmp_path):
    result, model, _ = pretrain(monkeypatch, [*TINY, "--bf16", "--save", str(tmp_path / "ckpt")])
    assert_trained_on_gpu(result, model, 4)
    assert sorted(result.valid_losses) == [2, 4]
    assert all(math.isfinite(v) for v in result.valid_losses.values())

    from megatron_eff.generation import generate
    from tools.generate import load_model

    generator_model = load_model(str(tmp_path / "ckpt"), "cuda")
    assert all(p.is_cuda for p in generator_model.parameters())
    vocab = generator_model.config.vocab_size - 1  # the run's NullTokenizer: ids 0..vocab-1, eod = vocab
    expected = generate(generator_model, [5, 17, 42], 8, vocab, eod=vocab)
    for extra in ([], ["--no-kv-cache"]):
        cmd = [sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(tmp_path / "ckpt"), "--prompt",
               "5 17 42", "--max-new-tokens", "8", "--device", "cuda", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == " ".join(map(str, [5, 17, 42, *expected]))


def test_gpu_run_matches_cpu_run(monkeypatch):
    """FP32: same initial weights (initialised on the CPU, then moved) and data, so the losses agree up to
    kernel rounding; a batch left on the CPU would fail, one fed twice or out of order would not agree."""
    gpu, model, _ = pretrain(monkeypatch, TINY)
    assert_trained_on_gpu(gpu, model, 4)
    cpu, cpu_model, _ = pretrain(monkeypatch, TINY, device=torch.device("cpu"))
    assert all(not p.is_cuda for chunk in cpu_model for p in chunk.parameters())
    assert gpu.losses == pytest.approx(cpu.losses, rel=1e-3)
    assert gpu.valid_losses == pytest.approx(cpu.valid_losses, rel=1e-3)


@pytest.mark.parametrize("impl", ["factorized", "mask"])
def test_mst_on_gpu(monkeypatch, impl):
    flags = [*TINY, "--bf16", "--train-iters", "6", "--mst", "--mst-phase-iters", "2,2,2", "--mst-update-interval",
             "1", "--mst-hsa-window", "8", "--mst-hsa-impl", impl]
    result, model, methods = pretrain(monkeypatch, flags)
    assert_trained_on_gpu(result, model, 6)
    (mst,) = methods.methods
    assert mst.updates > 0 and mst.saved_x() > 1.0  # the run went sparse (and HSA ran) ...
    assert all(w.mask.is_cuda for w in mst.weights) and mst.hsa_mask.is_cuda
    assert all(w.mask.all() for w in mst.weights)  # ... and restoration made it dense again


def test_fp8_scaled_mm_on_gpu(monkeypatch):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need an sm89+ GPU (Ada, Hopper or newer)")
    from megatron_eff.precision import precision_state

    flags = [*TINY, "--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "4"]
    real, model, _ = pretrain(monkeypatch, [*flags, "--fp8-gemm", "scaled_mm"])
    assert_trained_on_gpu(real, model, 4)
    state = precision_state(model)
    assert state and all(t.is_cuda for t in state.values())
    assert any(bool((t > 0).any()) for key, t in state.items() if key.endswith("amax_history"))
    emulated, _, _ = pretrain(monkeypatch, [*flags, "--fp8-gemm", "emulate"])
    # The same FP8 operands and scales; the emulation's BF16 GEMM rounds its operands, scaled_mm does not.
    assert real.losses[0] == pytest.approx(emulated.losses[0], rel=1e-2)


def test_torchrun_one_process_on_nccl(tmp_path):
    """torchrun with one process picks NCCL on a GPU machine: collectives, DCP save and the distributed
    optimizer's step all-reduce run on CUDA tensors; the result equals the plain single-process run."""
    flags = [*TINY_FLAGS, "--use-distributed-optimizer", "--save", str(tmp_path / "ckpt")]
    run = run_layout(tmp_path / "torchrun.pt", flags, nproc=1, torchrun=True)
    assert all(p.is_cuda for p in run["params"].values())
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "5"
    reference = run_layout(tmp_path / "single.pt", TINY_FLAGS)  # plain AdamW, no process group
    assert_same_run(run, reference, loss_rtol=1e-4, param_atol=1e-4)  # CUDA kernels may not be deterministic
