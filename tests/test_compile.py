"""`--torch-compile`: compiled transformer layers train like eager ones, resume exactly, and refuse what they
cannot run.

Tolerance: the runs are float64 and compared at 1e-6 (losses relative, parameters absolute). Inductor fuses and
reorders float reductions (norms, softmax, GEMM blocking), which moves a float64 result by ~1e-16 relative;
over a few AdamW steps with clipping a nearly cancelling gradient can amplify that (see `tests/dist_utils.py`),
still far below 1e-9. A real difference (an op missing from the graph, a stale parameter or mask, a collective
skipped) moves the losses by more than 1e-4. Compiling takes tens of seconds on a CPU (once per process;
inductor caches on disk), so the runs are marked slow.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.launch import check_launch
from megatron_eff.training import trainer as trainer_lib
from tests.dist_utils import ROOT, TINY_FLAGS, assert_same_run, run_layout

TINY = ["--model-preset", "llama-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--lr", "1e-3", "--lr-warmup-iters", "0",
        "--clip-grad", "0.05", "--log-interval", "100", "--eval-interval", "1000", "--eval-iters", "0"]
TOL = 1e-6


def run(*flags):
    return trainer_lib.pretrain(config_from_args(parse_args([*TINY, *flags])))


def assert_close(losses, reference):
    assert len(losses) == len(reference)
    for i, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= TOL * abs(b), f"iteration {i + 1}: {a} vs {b}"


@pytest.mark.slow
def test_compiled_matches_eager_and_resumes_exactly(tmp_path, float64, capsys):
    """4 compiled iterations = 4 eager ones (to 1e-6); 2 + resumed 2 compiled = 4 straight (bitwise); the
    compiled run's checkpoint resumes eagerly like an eager run's (the parameter names are the same)."""
    eager = run("--train-iters", "4")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    straight = run("--train-iters", "4", "--torch-compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the layers really were compiled
    assert "torch.compile: first iteration took" in capsys.readouterr().out
    assert_close(straight.losses, eager.losses)
    ckpt = str(tmp_path / "ckpt")
    first = run("--train-iters", "4", "--exit-interval", "2", "--save", ckpt, "--torch-compile")
    second = run("--train-iters", "4", "--load", ckpt, "--torch-compile")
    assert first.losses + second.losses == straight.losses  # bitwise, as eager resume
    assert_close(run("--train-iters", "4", "--load", ckpt).losses, eager.losses[2:])


@pytest.mark.slow
def test_compiled_tp2_sequence_parallel_matches_single_process(tmp_path, llama_reference):
    """Two gloo ranks, TP2 + sequence parallel: the mappings' collectives are graph breaks inside each layer."""
    run = run_layout(tmp_path / "tp2.pt", [*TINY_FLAGS, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                           "--torch-compile"], 2)
    assert run["dynamo_graphs"] > 0
    assert_same_run(run, llama_reference, loss_rtol=TOL, param_atol=TOL)


def test_refused_with_transformer_engine_in_one_line():
    proc = subprocess.run([sys.executable, "pretrain.py", *TINY, "--torch-compile", "--transformer-impl",
                           "transformer_engine"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("pretrain.py: error: --torch-compile is for --transformer-impl local "
                                   "(Transformer Engine's layers are not compiled here)")


def test_refused_combinations_name_the_flags():
    with pytest.raises(ValueError, match="--torch-compile cannot be combined with --recompute-activations"):
        config_from_args(parse_args([*TINY, "--torch-compile", "--recompute-activations"]))
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'fastest'"
        parse_args([*TINY, "--torch-compile-mode", "fastest"])


def test_missing_cpp_compiler_is_refused_before_training(monkeypatch):
    """On CPU inductor needs a C++ compiler: without one the launch check says so (not the first forward)."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    config = config_from_args(parse_args([*TINY, "--torch-compile"]))
    with pytest.raises(FileNotFoundError, match="--torch-compile on CPU needs a C\\+\\+ compiler"):
        check_launch(config, world_size=1)
