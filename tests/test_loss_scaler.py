"""FP16 dynamic loss scaling: growth, halving with hysteresis, the floor, static scales, and the trainer:
overflows skip steps without tripping --max-bad-steps, the scale adapts, its state is checkpointed."""

import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.precision.loss_scaler import LossScaler
from megatron_eff.training.trainer import Trainer


def test_dynamic_scale_grows_after_window_and_halves_on_overflow():
    s = LossScaler(initial_scale=1024.0, window=3, min_scale=256.0, hysteresis=1)
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 2048.0
    s.update(overflow=True)
    assert s.scale == 1024.0
    s.update(overflow=False)
    s.update(overflow=False)
    s.update(overflow=True)  # the good-step count restarts after an overflow
    assert s.scale == 512.0
    for _ in range(5):
        s.update(overflow=True)
    assert s.scale == 256.0  # floor


def test_hysteresis_and_static_scale():
    s = LossScaler(initial_scale=64.0, window=100, hysteresis=2)
    s.update(overflow=True)
    assert s.scale == 64.0
    s.update(overflow=True)
    assert s.scale == 32.0
    static = LossScaler(8.0, dynamic=False)
    static.update(overflow=True)
    assert static.scale == 8.0


TINY = ["--model-preset", "llama-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--seq-length", "16", "--max-position-embeddings", "16", "--hidden-size", "32", "--num-attention-heads", "2",
        "--num-query-groups", "2", "--group-query-attention", "--ffn-hidden-size", "64", "--log-interval", "100",
        "--eval-iters", "0", "--fp16", "--hysteresis", "1"]


def test_fp16_overflow_skips_without_hard_stop_and_scale_is_checkpointed(tmp_path):
    # 2**30 overflows FP16 gradients: the scale halves every step until gradients fit; --max-bad-steps 2 must
    # not stop the run (overflows are not NaN losses)
    flags = [*TINY, "--initial-loss-scale", str(2.0**30), "--max-bad-steps", "2", "--train-iters", "24",
             "--save", str(tmp_path)]
    trainer = Trainer(config_from_args(parse_args(flags)))
    result = trainer.train()
    scale = trainer.precision.loss_scaler.scale
    assert 2 <= result.state.skipped_iterations < 24
    assert scale == 2.0 ** (30 - result.state.skipped_iterations)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    resumed = Trainer(config_from_args(parse_args([*flags[:-2], "--train-iters", "24", "--load", str(tmp_path)])))
    resumed.train()
    assert resumed.precision.loss_scaler.scale == scale  # restored from the checkpoint (24 iters: no step run)
