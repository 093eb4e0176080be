"""LR schedule values against the formulas."""

import math

import pytest

from megatron_eff.config import OptimizerConfig
from megatron_eff.training.lr_schedule import learning_rate


def test_warmup_then_cosine_to_min():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="cosine")
    assert learning_rate(0, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(9, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(10, cfg, 110) == pytest.approx(1.0)
    assert learning_rate(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(110, cfg, 110) == pytest.approx(0.1)
    assert learning_rate(500, cfg, 110) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = OptimizerConfig(lr=1.0, min_lr=0.0, lr_decay_style="linear")
    assert [learning_rate(i, lin, 4) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimizerConfig(lr=0.5, lr_warmup_iters=2, lr_decay_style="constant")
    assert [learning_rate(i, const, 10) for i in range(4)] == pytest.approx([0.25, 0.5, 0.5, 0.5])


def test_decay_iters_shorter_than_run():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.2, lr_decay_style="linear", lr_decay_iters=10)
    assert learning_rate(10, cfg, 100) == pytest.approx(0.2)
    assert learning_rate(50, cfg, 100) == pytest.approx(0.2)
