"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to `--min-lr`.

A pure function of the iteration, so resuming needs nothing but the iteration number.
"""

from __future__ import annotations

import dataclasses
import math

from megatron_eff.config import OptimizerConfig


def learning_rate(iteration: int, config: OptimizerConfig, train_iters: int,
                  consumed_samples: int | None = None) -> float:
    """LR for the step that produces iteration `iteration + 1` (0-based step index). A sample-based schedule
    (`config.lr_decay_samples` set) is a function of `consumed_samples` (before the step) instead."""
    if config.lr_decay_samples is not None:
        if consumed_samples is None:
            raise ValueError("a sample-based LR schedule needs the consumed samples")
        return sample_learning_rate(consumed_samples, config)
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


def sample_learning_rate(consumed_samples: int, config: OptimizerConfig) -> float:
    """Megatron-LM's OptimizerParamScheduler.get_lr with steps counted in samples (`--train-samples` runs):
    linear warm-up `lr * samples / warmup` up to `--lr-warmup-samples`, then the decay over
    `--lr-decay-samples`, `--min-lr` after it."""
    warmup, decay = config.lr_warmup_samples, config.lr_decay_samples
    if warmup > 0 and consumed_samples <= warmup:
        return config.lr * consumed_samples / warmup
    if config.lr_decay_style == "constant":
        return config.lr
    if consumed_samples > decay:
        return config.min_lr
    progress = (consumed_samples - warmup) / max(decay - warmup, 1)
    if config.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr + coeff * (config.lr - config.min_lr)


# The flags that shape the schedule, by OptimizerConfig field (the decay length also follows --train-iters).
SCHEDULE_FLAGS = {"lr": "--lr", "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style",
                  "lr_warmup_iters": "--lr-warmup-iters", "lr_decay_iters": "--lr-decay-iters",
                  "lr_warmup_samples": "--lr-warmup-samples", "lr_decay_samples": "--lr-decay-samples"}


def schedule_differences(config: OptimizerConfig, train_iters: int, saved_optim: dict, saved_train_iters: int,
                         ) -> dict[str, tuple]:
    """{flag: (checkpoint's value, this run's value)} for the schedule settings that differ from those of
    the run that wrote a checkpoint (`saved_optim`: its `OptimizerConfig` as a dict)."""
    differences = {flag: (saved_optim.get(field), getattr(config, field)) for field, flag in SCHEDULE_FLAGS.items()
                   if field in saved_optim and saved_optim[field] != getattr(config, field)}
    saved_length = saved_optim.get("lr_decay_iters") or saved_train_iters
    length = config.lr_decay_iters or train_iters
    if saved_length != length and "--lr-decay-iters" not in differences:
        differences["--train-iters (the decay length)"] = (saved_length, length)
    return differences


def checkpoint_schedule(config: OptimizerConfig, saved_optim: dict, saved_train_iters: int) -> OptimizerConfig:
    """`config` with the checkpoint's schedule settings (Megatron's --use-checkpoint-opt_param-scheduler): the
    decay keeps the length it had in the run that wrote the checkpoint."""
    values = {field: saved_optim[field] for field in SCHEDULE_FLAGS if field in saved_optim}
    values["lr_decay_iters"] = saved_optim.get("lr_decay_iters") or saved_train_iters
    return dataclasses.replace(config, **values)
