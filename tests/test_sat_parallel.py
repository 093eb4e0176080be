"""SAT under TP2 x DP2 (with the distributed optimizer) and PP2 against one process (torchrun, gloo, CPU).

The single process selects in 2 balanced blocks (`--sat-balance-blocks 2`); under TP2 the default (the TP
size) gives each rank one block, chosen from its own shard without communication. Every layout must keep the
same heads and channels at every iteration (DP replicas included) and give the same losses and parameters as
the single process (float64: see tests/dist_utils.py for why 1e-5 is then far above any reordering effect).
The run crosses the constant stage, both stairs of the ladder and the dense end, and freezes omitted rows.
Sequence parallelism (the wanda input statistics are then reduced over TP too) and activation recompute
(which runs the statistics hooks twice) are covered by a TP2 run. Under GQA with `--sat-head-unit query-head`
(4 query heads in 2 groups, one group per TP rank) each TP2 rank keeps its own count of its group's query heads,
K/V dense, as the single process does in 2 blocks.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

pytestmark = pytest.mark.slow

# MHA with 4 heads (4 query groups) so each TP rank has 2 heads to choose from; the ladder starts at t = 4.
SAT_FLAGS = [*TINY_FLAGS, "--num-query-groups", "4", "--train-iters", "8", "--sat", "--sat-omission-rate-heads",
             "0.5", "--sat-omission-rate-mlp", "0.5", "--sat-lors-start", "0.5", "--sat-lors-steps", "2",
             "--clip-grad", "1.0", "--sat-exempt-layers", "none"]


def merged_selections(run: dict) -> dict[int, list]:
    """{dp rank: [per iteration: {layer: (groups, channels)}]}: the union over TP ranks and pipeline stages."""
    out: dict[int, list] = {}
    for rank in run["sat"]:
        its = out.setdefault(rank["dp"], [{} for _ in rank["selections"]])
        for merged, selection in zip(its, rank["selections"]):
            for layer, (groups, channels) in selection.items():
                old = merged.get(layer, ([], []))
                merged[layer] = (sorted(old[0] + groups), sorted(old[1] + channels))
    return out


@pytest.fixture(scope="module")
def sat_reference(tmp_path_factory):
    return run_layout(tmp_path_factory.mktemp("sat") / "ref.pt", [*SAT_FLAGS, "--sat-balance-blocks", "2"])


@pytest.mark.parametrize(
    "name, flags, nproc",
    [
        ("tp2-dp2-distopt", ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"], 4),
        ("pp2", ["--pipeline-model-parallel-size", "2", "--sat-balance-blocks", "2"], 2),
        ("tp2-sp-recompute", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--recompute-activations"], 2),
    ],
)
def test_sat_layout_selects_the_same_units_and_matches_single_process(tmp_path, sat_reference, name, flags, nproc):
    run = run_layout(tmp_path / f"{name}.pt", [*SAT_FLAGS, *flags], nproc)
    reference = merged_selections(sat_reference)[0]
    assert len(reference) == 8
    assert len(reference[0][0][0]) == 2 and len(reference[0][0][1]) == 64  # rho = 0.5 of 4 heads, 128 channels
    assert len(reference[-1][0][0]) == 4  # dense at the end of the ladder
    selections = merged_selections(run)
    for dp, its in selections.items():
        assert its == reference, f"dp rank {dp} selected other units than the single process"
    # Parameters to 1e-9: a layout that failed to freeze an omitted row would let AdamW's weight decay move it
    # by lr * wd * |w| ~ 1e-3 * 0.1 * 0.02 = 2e-6 per step, and float64 reordering stays below ~1e-12.
    assert_same_run(run, sat_reference, param_atol=1e-9)


def test_sat_query_heads_under_tp2_match_single_process(tmp_path):
    gqa = [*SAT_FLAGS, "--num-query-groups", "2", "--sat-head-unit", "query-head"]
    reference = run_layout(tmp_path / "ref.pt", [*gqa, "--sat-balance-blocks", "2"])
    run = run_layout(tmp_path / "tp2.pt", [*gqa, "--tensor-model-parallel-size", "2"], 2)
    selections = merged_selections(reference)[0]
    # of 4 query heads in 2 blocks (= the 2 groups): rho 0.5 keeps one head of each group; 0.25 rounds to both
    assert [len(selections[it][0][0]) for it in (0, 4, 7)] == [2, 4, 4]
    assert all(sorted(h // 2 for h in selections[it][layer][0]) == [0, 1] for it in range(4) for layer in range(4))
    assert merged_selections(run)[0] == selections
    assert_same_run(run, reference, param_atol=1e-9)
