"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to `--min-lr`.

A pure function of the iteration, so resuming needs nothing but the iteration number.
"""

from __future__ import annotations

import math

from megatron_eff.config import OptimizerConfig


def learning_rate(iteration: int, config: OptimizerConfig, train_iters: int) -> float:
    """LR for the step that produces iteration `iteration + 1` (0-based step index)."""
    warmup = config.lr_warmup_iters
    if warmup > 0 and iteration < warmup:
        return config.lr * (iteration + 1) / warmup
    if config.lr_decay_style == "constant":
        return config.lr
    decay_iters = config.lr_decay_iters or train_iters
    span = max(decay_iters - warmup, 1)
    progress = min(max(iteration - warmup, 0) / span, 1.0)
    if config.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + coeff * (config.lr - config.min_lr)
