"""Pruning under TP2 (with and without sequence parallelism), PP2 and DP2 against one process (torchrun,
gloo, CPU): the same losses, weights, mask logits and Lagrange multipliers (`assert_same_run` compares every
parameter, `prune.*` included). Gates are drawn per global micro-batch from the full mask's noise, the
expected-size totals are reduced over TP and PP, and the replicated hidden mask and lambdas are summed over
the pipeline: any slip there changes the masks or lambdas by far more than float64 reordering (see
tests/dist_utils.py for the tolerances)."""

from __future__ import annotations

import pytest

from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

pytestmark = pytest.mark.slow

PRUNE_FLAGS = [*TINY_FLAGS, "--train-iters", "4", "--prune", "--prune-target-num-layers", "2",
               "--prune-target-hidden-size", "48", "--prune-target-num-attention-heads", "2",
               "--prune-target-ffn-hidden-size", "64", "--prune-mask-lr", "0.05", "--prune-lambda-lr", "0.05"]


@pytest.fixture(scope="module")
def prune_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("prune") / "ref.pt", PRUNE_FLAGS)


@pytest.mark.parametrize("name, flags", [
    ("tp2", ["--tensor-model-parallel-size", "2"]),
    ("tp2-sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("pp2", ["--pipeline-model-parallel-size", "2"]),
    ("dp2-distopt", ["--use-distributed-optimizer"]),
])
def test_pruning_layout_matches_single_process(tmp_path, prune_reference, name, flags):
    run = run_layout(tmp_path / f"{name}.pt", [*PRUNE_FLAGS, *flags], nproc=2)
    assert_same_run(run, prune_reference)
    lambdas = prune_reference["params"]["prune.lambdas"]
    assert (lambdas[:, 0] < 0).all()  # the multipliers moved, so their parity is not a parity of zeros
    assert any(k.startswith("prune.layers.") for k in run["params"])
