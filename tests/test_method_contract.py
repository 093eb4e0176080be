"""The method contract under every kind of parallelism: a test method (`tests/dist/dummy_method.py`) that adds
parameters in `transform_model`, gives them their own LR and gradient ascent (`param_groups`), adds an
auxiliary loss on every pipeline stage (`loss_terms`) and keeps sharded checkpoint state, trained under
TP2 x PP2 x DP2 with the distributed optimizer, must match one process (float64: see tests/dist_utils.py), and
a resume from that run's mid-run checkpoint in one process must continue exactly."""

from __future__ import annotations

import pytest
import torch

from megatron_eff.config import OptimizerConfig
from megatron_eff.training.checkpointing import TRACKER
from megatron_eff.training.lr_schedule import learning_rate
from megatron_eff.training.optimizer import build_optimizer, set_learning_rate
from tests.dist_utils import TINY_FLAGS, assert_same_run, run_layout

FLAGS = [*TINY_FLAGS, "--dummy", "--dummy-lr", "3e-2", "--train-iters", "4"]


def test_dummy_method_single_process_trains_its_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("DUMMY_METHOD", "1")
    run = run_layout(tmp_path / "ref.pt", FLAGS)
    gates = {k: v for k, v in run["params"].items() if k.endswith("dummy_gate")}
    lambdas = {k: v for k, v in run["params"].items() if k.endswith("dummy_lambda")}
    assert len(gates) == len(lambdas) == 4
    assert all(abs(v.item() - 1.0) > 1e-4 for v in gates.values())  # the gates trained
    assert all(v.item() != 0 for v in lambdas.values())  # the multipliers trained (ascent: see below)
    assert run["method"]["events"] == {"before_iteration": 4, "after_backward": 4, "after_step": 4,
                                       "loss_terms": 4 * 4}  # 4 micro-batches x 4 iterations, one chunk


def test_method_param_groups_get_their_own_lr_and_ascent():
    weight = torch.nn.Parameter(torch.ones(4, 4))
    gate, lam = torch.nn.Parameter(torch.ones(())), torch.nn.Parameter(torch.zeros(()))
    config = OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=0, weight_decay=0.1)
    optimizer = build_optimizer([("w", weight), ("gate", gate), ("lam", lam)], config, extra_groups=[
        {"params": [gate], "max_lr": 0.5, "min_lr": 0.1}, {"params": [lam], "max_lr": 0.2, "maximize": True}])
    groups = {id(g["params"][0]): g for g in optimizer.param_groups}
    assert sum(p is gate for g in optimizer.param_groups for p in g["params"]) == 1  # left the default groups
    set_learning_rate(optimizer, learning_rate(5, config, 10), 5, config, 10)
    assert groups[id(weight)]["lr"] == pytest.approx(learning_rate(5, config, 10))
    own = OptimizerConfig(lr=0.5, min_lr=0.1, lr_warmup_iters=0)
    assert groups[id(gate)]["lr"] == pytest.approx(learning_rate(5, own, 10))
    assert groups[id(gate)]["weight_decay"] == 0.0
    for p in (weight, gate, lam):
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert gate.item() < 1.0 and lam.item() > 0.0  # descent on the gate, ascent on the multiplier
    optimizer.reset_state(weight, torch.eye(4, dtype=torch.bool))
    assert (optimizer.state[weight]["exp_avg"].diagonal() == 0).all()
    assert (optimizer.state[weight]["exp_avg"] != 0).sum() == 12
    with pytest.raises(ValueError, match="betas"):
        build_optimizer([("w", weight)], config, extra_groups=[{"params": [gate], "betas": (0.9, 0.9)}])


@pytest.mark.slow
def test_dummy_method_tp2_pp2_dp2_distopt_matches_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("DUMMY_METHOD", "1")
    reference = run_layout(tmp_path / "ref.pt", FLAGS)
    ckpt = tmp_path / "ckpt"
    run = run_layout(tmp_path / "tp2pp2dp2.pt",
                     [*FLAGS, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      "--use-distributed-optimizer", "--save", str(ckpt), "--save-interval", "2"], nproc=8,
                     timeout=600)
    assert_same_run(run, reference)
    assert run["method"]["ema"] == pytest.approx(reference["method"]["ema"], abs=1e-9)
    for events in run["method"]["events"]:  # each rank: 4 iterations, 2 micro-batches (dp 2) on its one chunk
        assert events == {"before_iteration": 4, "after_backward": 4, "after_step": 4, "loss_terms": 2 * 4}
    # resume the checkpoint of iteration 2 (Megatron's tracker names the one to load) in one process
    (ckpt / TRACKER).write_text("2")
    resumed = run_layout(tmp_path / "resumed.pt", [*FLAGS, "--load", str(ckpt)])
    assert resumed["losses"] == pytest.approx(reference["losses"][2:], rel=1e-9)
    assert_same_run({**resumed, "losses": reference["losses"]}, reference)  # final parameters
    assert resumed["method"]["ema"] == pytest.approx(reference["method"]["ema"], abs=1e-9)
    assert resumed["method"]["events"]["after_step"] == 4  # 2 restored from meta.json + 2 run
