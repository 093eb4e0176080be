"""FP16 loss scaling: multiply the loss before backward so small gradients survive FP16, divide after.

- static (`--loss-scale S`): the scale never changes; an overflow still skips the step. With `--unit-scaling`
  and no `--loss-scale` the scale is a static 1: a unit-scaled model's gradients are ~unit already, which is
  the point of unit scaling (no loss scaling).
- dynamic (Megatron-LM's rule): start at `--initial-loss-scale`; an overflow (a non-finite gradient) skips
  the step and, after `--hysteresis` overflows, halves the scale (not below `--min-loss-scale`);
  `--loss-scale-window` steps in a row without overflow double it.

The state is three numbers kept in one float64 tensor so checkpoints carry it (`state_tensors`).
"""

from __future__ import annotations

import torch


class LossScaler:
    def __init__(self, initial_scale: float = 2.0**16, window: int = 1000, min_scale: float = 1.0,
                 hysteresis: int = 2, dynamic: bool = True):
        self.window, self.min_scale, self.hysteresis, self.dynamic = window, min_scale, hysteresis, dynamic
        # [scale, good steps since the last overflow or growth, overflows left before halving]
        self.state = torch.tensor([initial_scale, 0.0, float(hysteresis)], dtype=torch.float64)

    @classmethod
    def from_config(cls, precision) -> LossScaler:
        if precision.loss_scale is not None:
            return cls(precision.loss_scale, dynamic=False)
        if precision.unit_scaling:
            return cls(1.0, dynamic=False)
        return cls(precision.initial_loss_scale, precision.loss_scale_window, precision.min_loss_scale,
                   precision.hysteresis)

    @property
    def scale(self) -> float:
        return float(self.state[0])

    def update(self, overflow: bool) -> None:
        """After each step: `overflow` = the (scaled) gradients had an inf/NaN."""
        if not self.dynamic:
            return
        scale, good, left = self.state.tolist()
        if overflow:
            good, left = 0.0, left - 1
            if left <= 0:
                scale, left = max(scale / 2.0, self.min_scale), float(self.hysteresis)
        else:
            good += 1
            if good >= self.window:
                scale, good, left = scale * 2.0, 0.0, float(self.hysteresis)
        self.state.copy_(torch.tensor([scale, good, left], dtype=torch.float64))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint entries (loaded in place)."""
        return {"loss_scaler.state": self.state}
