"""MST under TP x DP (with the distributed optimizer) and PP against one process (torchrun, gloo, CPU).

Topology decisions are global: every layout must end with the same masks as the single-process run, and
the same losses (<= 1e-5 relative) and parameters, through warm-up, ultra-sparse (with HSA) and
restoration phases with a topology update every 2 iterations.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

pytestmark = pytest.mark.slow

MST_FLAGS = [*TINY_FLAGS, "--train-iters", "12", "--mst", "--mst-phase-iters", "4,4,4", "--mst-update-interval", "2",
             "--mst-max-sparsity", "0.8", "--mst-hsa-window", "4", "--clip-grad", "1.0",
             "--no-mst-decay-embeddings"]  # its own optimizer group must shard and step like the others


@pytest.fixture(scope="module")
def mst_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("mst") / "ref.pt", MST_FLAGS)


def assert_same_masks(run: dict, reference: dict, final_dense: bool = True) -> None:
    assert run["masks"].keys() == reference["masks"].keys() and reference["masks"]
    for name, mask in reference["masks"].items():
        assert torch.equal(run["masks"][name], mask), name
        assert not final_dense or mask.all(), f"{name}: restoration must end dense"


@pytest.mark.parametrize(
    "name, flags, nproc",
    [
        ("tp2-dp2-distopt", ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"], 4),
        ("pp2", ["--pipeline-model-parallel-size", "2"], 2),
    ],
)
def test_mst_layout_matches_single_process(tmp_path, mst_reference, name, flags, nproc):
    run = run_layout(tmp_path / f"{name}.pt", [*MST_FLAGS, *flags], nproc)
    assert_same_run(run, mst_reference)
    assert_same_masks(run, mst_reference)


def test_mst_masks_match_in_the_ultra_sparse_phase(tmp_path):
    """Stop inside the ultra-sparse phase: masks are sparse there, and TP x DP picks the same ones."""
    flags = [*MST_FLAGS, "--exit-interval", "7"]
    reference = run_layout(tmp_path / "ref.pt", flags)
    run = run_layout(tmp_path / "tp2dp2.pt", [*flags, "--tensor-model-parallel-size", "2"], 4)
    assert_same_run(run, reference)
    assert_same_masks(run, reference, final_dense=False)
    kept = sum(int(m.sum()) for m in reference["masks"].values())
    total = sum(m.numel() for m in reference["masks"].values())
    assert abs(1 - kept / total - 0.8) < 0.01
