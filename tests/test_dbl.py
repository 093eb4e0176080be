"""Dynamic batch loading: the update against the formula on a hand example, reference losses from flags and
files, weights that follow the loss gaps and reach the batches, exact resume, and DP2 against one process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.methods.dbl.method import dbl_update, read_reference_losses
from megatron_eff.training.trainer import Trainer
from tests.dist_utils import assert_same_run, run_layout
from tests.test_trainer_data import make_domain

SEQ = 16


def test_update_matches_the_formula_by_hand():
    # w = (0.5, 0.5), delta = (1, 0): alpha = (e, 1) / (e + 1); then (1 - c) alpha + c / 2
    e = math.e
    alpha = np.array([e / (e + 1), 1 / (e + 1)])
    new = dbl_update([0.5, 0.5], [3.0, 2.0], [2.0, 2.0], eta=1.0, smoothing=1e-4)
    assert new.tolist() == pytest.approx(((1 - 1e-4) * alpha + 1e-4 / 2).tolist(), abs=1e-15)
    # eta scales the gap; a domain below its reference loses weight unless the gap is clipped at 0
    assert dbl_update([0.25, 0.75], [1.0, 2.0], [2.0, 2.0], eta=0.5, smoothing=0.0).tolist() == pytest.approx(
        [0.25 * math.exp(-0.5) / (0.25 * math.exp(-0.5) + 0.75), 0.75 / (0.25 * math.exp(-0.5) + 0.75)], abs=1e-15)
    assert dbl_update([0.25, 0.75], [1.0, 2.0], [2.0, 2.0], smoothing=0.0, clip_negative=True).tolist() == \
        pytest.approx([0.25, 0.75], abs=1e-15)
    # a zero weight comes back only through the smoothing
    assert dbl_update([0.0, 1.0], [9.0, 2.0], [2.0, 2.0], smoothing=0.1).tolist() == pytest.approx([0.05, 0.95])


def test_reference_losses_from_values_and_files(tmp_path):
    assert read_reference_losses(("2.5", "1.0"), ["prose", "code"]) == [2.5, 1.0]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"code": 1.5, "prose": 2.0}))
    assert read_reference_losses((str(path),), ["prose", "code"]) == [2.0, 1.5]
    text = tmp_path / "ref.txt"
    text.write_text("2.0\n1.5\n")
    assert read_reference_losses((str(text),), ["prose", "code"]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="has 1 values for 2 --data-path domains"):
        read_reference_losses(("2.0",), ["prose", "code"])
    with pytest.raises(ValueError, match=r"no loss for domains \['code'\]"):
        path.write_text(json.dumps({"prose": 2.0}))
        read_reference_losses((str(path),), ["prose", "code"])
    with pytest.raises(FileNotFoundError, match="--dbl-reference-loss nope.json"):
        read_reference_losses(("nope.json",), ["prose", "code"])


def data_flags(tmp_path, *extra: str) -> list[str]:
    prose = make_domain(tmp_path, "prose", 0, 50, seed=1, num_docs=120)
    code = make_domain(tmp_path, "code", 100, 150, seed=2, num_docs=120)
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--vocab-size", "200", "--data-path", "0.5", prose, "0.5",
            code, "--split", "80,20,0", "--micro-batch-size", "2", "--global-batch-size", "4", "--log-interval",
            "100", "--lr", "3e-3", "--seed", "5", "--eval-iters", "1", "--eval-interval", "100",
            "--data-max-blend-weight", "1", *extra]


def test_weights_follow_the_gap_and_reach_the_batches(tmp_path):
    # code's reference is far below any loss it reaches here, prose's far above: code gains weight
    trainer = Trainer(config_from_args(parse_args(data_flags(
        tmp_path, "--train-iters", "4", "--dbl", "--dbl-update-interval", "2", "--dbl-reference-loss", "9", "0"))))
    trainer.train()
    dbl = trainer.methods.get("dbl")
    schedule = trainer.batch_source.state_dict()["weight_schedule"]
    assert [start for start, _ in schedule] == [0, 8, 16]  # after iterations 2 and 4 (4 samples each)
    losses = dbl.last_losses
    assert dbl.weights == pytest.approx(dbl_update(schedule[1][1], [losses["prose"], losses["code"]], [9, 0]).tolist())
    assert schedule[1][1][1] > 0.99 and schedule[2][1][1] > schedule[1][1][1]
    scalars = dbl.log_scalars()
    assert scalars["dbl/weight/code"] == pytest.approx(schedule[2][1][1])
    assert scalars["dbl/gap/code"] == pytest.approx(losses["code"])
    # the samples of iterations 3 and 4, under the first update: code, but for the one early prose pick of the
    # greedy blending rule (argmax w_d max(i, 1) - count_d picks prose at i = 1)
    blend = trainer.batch_source.dataset
    assert [blend.locate(i)[0] for i in range(8, 16)].count(0) <= 1
    assert sorted(blend.locate(i)[0] for i in range(8)) == [0] * 4 + [1] * 4  # before it: the 50/50 blend


def test_dbl_resumes_exactly(tmp_path):
    base = data_flags(tmp_path, "--train-iters", "6", "--dbl", "--dbl-update-interval", "2", "--dbl-reference-loss",
                      "5", "4")
    full = Trainer(config_from_args(parse_args([*base, "--save", str(tmp_path / "a")]))).train()
    Trainer(config_from_args(parse_args([*base, "--save", str(tmp_path / "b"), "--exit-interval", "3"]))).train()
    trainer = Trainer(config_from_args(parse_args([*base, "--load", str(tmp_path / "b")])))
    rest = trainer.train()
    assert rest.losses == full.losses[3:]
    assert trainer.batch_source.state_dict()["weight_schedule"] == \
        Trainer(config_from_args(parse_args([*base, "--load", str(tmp_path / "a")]))).batch_source.state_dict()[
            "weight_schedule"]


def test_dbl_refuses_runs_without_domains(tmp_path):
    with pytest.raises(ValueError, match="--dbl needs a blended --data-path"):
        config_from_args(parse_args(["--mock-data", "--train-iters", "2", "--dbl", "--dbl-reference-loss", "1"]))
    with pytest.raises(ValueError, match="--dbl needs --dbl-reference-loss"):
        config_from_args(parse_args(data_flags(tmp_path, "--train-iters", "2", "--dbl")))


@pytest.mark.slow
def test_dbl_data_parallel_matches_single_process(tmp_path):
    """DP2: every rank must compute the same weights from the DP-reduced domain losses, or the two ranks'
    samples (and so the losses and weights) differ from the single-process run's."""
    flags = data_flags(tmp_path, "--train-iters", "6", "--dbl", "--dbl-update-interval", "2",
                       "--dbl-reference-loss", "5", "4")
    reference = run_layout(tmp_path / "ref.pt", flags)
    run = run_layout(tmp_path / "dp2.pt", flags, nproc=2)
    assert_same_run(run, reference)
