"""CoLM under data, tensor and pipeline parallelism: every rank ends with the single process' coreset (the
selection is global) and the run matches the single process (float64, see tests/dist_utils.py for why the
1e-5 tolerances are ~1e5 times the rounding effect; the coreset itself is exact, see the quantisation in
megatron_eff/methods/colm/selection.py)."""

from __future__ import annotations

import pytest

from tests.dist_utils import HARNESS, TINY_FLAGS, assert_same_run, run_layout
from tests.test_colm import make_domain

COLM_HARNESS = HARNESS.parent / "run_colm.py"


def colm_flags(tmp_path) -> list[str]:
    big = make_domain(tmp_path, "big", 0, 60, seed=1, num_docs=80)
    other = make_domain(tmp_path, "other", 60, 120, seed=2, num_docs=80)
    small = make_domain(tmp_path, "small", 120, 180, seed=3, num_docs=40)
    flags = [f for f in TINY_FLAGS if f != "--mock-data"]
    return [*flags, "--data-path", "0.5", big, "0.35", other, "0.15", small, "--split", "100,0,0",
            "--train-iters", "3", "--colm", "--colm-large-batch-size", "16", "--colm-keep-sources", "small"]


def run_colm(out, flags, nproc=1, timeout=300) -> dict:
    import tests.dist_utils as du

    saved = du.HARNESS
    du.HARNESS = COLM_HARNESS
    try:
        return run_layout(out, flags, nproc=nproc, timeout=timeout)
    finally:
        du.HARNESS = saved


@pytest.mark.slow
def test_colm_dp2_and_tp2_pp2_dp2_select_the_single_process_coreset(tmp_path):
    flags = colm_flags(tmp_path)
    reference = run_colm(tmp_path / "ref.pt", flags)
    (ref_selections,) = reference["selections"]
    assert len(ref_selections) == 3 and all(len(s) == 8 for s in ref_selections)
    assert ref_selections[0] != list(range(8))  # a selection, not the first samples of the pool
    for name, extra, nproc in (("dp2", [], 2),
                               ("tp2pp2dp2", ["--tensor-model-parallel-size", "2",
                                              "--pipeline-model-parallel-size", "2"], 8)):
        run = run_colm(tmp_path / f"{name}.pt", [*flags, *extra], nproc=nproc, timeout=600)
        assert all(s == ref_selections for s in run["selections"]), name  # every rank, the same coreset
        assert_same_run(run, reference)
