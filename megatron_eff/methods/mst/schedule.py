"""MST's schedule: the target sparsity after each iteration, the phases and the topology-update iterations.

    warm-up (dense -> s_max)  |  ultra-sparse (s_max)  |  restoration (s_max -> dense)  |  dense tail

Phases are `--mst-phase-iters` or `--mst-phase-fractions` of `--train-iters` (default 0.2/0.4/0.2: the last
20 % of the run trains dense, so the weights regrown at the end of restoration still get trained). The two
ramps have their own shapes:
- warm-up (`--mst-schedule`): `staircase` (stairs of `--mst-stair-iters` iterations, at least
  `--mst-schedule-steps` stairs per ramp, the first one dense), `linear`, or `cubic` 1 - (1 - x)^3;
- restoration (`--mst-restore-schedule`): `cubic` s_max (1 - x)^3 (most weights are back within the first
  third of the phase), `linear`, `staircase`, or `mirror` (the warm-up ramp reversed in time).

A topology update (`MST._update_topology`) runs after iteration t when
- t is a multiple of the update interval: drop the drop fraction (cosine-decayed) and regrow (churn) while
  absorbing any change of the target -- a continuous ramp is sampled only here;
- a staircase stair starts, or warm-up / restoration ends: only resize to the new target, no churn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_eff.methods.mst.config import MSTConfig


@dataclass(frozen=True)
class MSTSchedule:
    """Target sparsity s(t) after iteration t (t completed iterations; the mask after the update at t is
    used by iterations t+1, ...), phase boundaries and the topology-update iterations."""

    warm_end: int
    ultra_end: int
    restore_end: int
    max_sparsity: float
    shape: str = "staircase"
    steps: int = 4
    update_interval: int = 100
    drop_fraction: float = 0.3
    restore_shape: str = "cubic"
    stair_iters: int = 1000

    @classmethod
    def from_config(cls, config: MSTConfig, train_iters: int) -> MSTSchedule:
        if config.phase_iters is not None:
            warm, ultra, restore = config.phase_iters
        else:
            fw, fu, fr = config.phase_fractions
            warm, ultra = round(fw * train_iters), round(fu * train_iters)
            restore = train_iters - warm - ultra if abs(fw + fu + fr - 1) < 1e-9 else round(fr * train_iters)
        phases = [n for n in (warm, ultra, restore) if n > 0]
        # Several updates per phase whatever the run length: at most a quarter of the shortest phase.
        interval = max(1, min(config.update_interval, min(phases) // 4)) if phases else config.update_interval
        return cls(warm, warm + ultra, warm + ultra + restore, config.max_sparsity, config.schedule,
                   config.schedule_steps, interval, config.drop_fraction, config.restore_schedule,
                   config.stair_iters)

    def _ramp(self, shape: str, i: int, length: int) -> float:
        """0 -> 1 over i in [0, length] iterations of a ramp."""
        x = i / length
        if shape == "linear":
            return x
        if shape == "cubic":
            return 1 - (1 - x) ** 3
        stair = min(self.stair_iters, length / self.steps)  # staircase: iterations per stair
        return math.floor(i / stair + 1e-9) / math.ceil(length / stair - 1e-9)

    def target_sparsity(self, t: int) -> float:
        if t < self.warm_end:
            return self.max_sparsity * self._ramp(self.shape, t, self.warm_end)
        if t <= self.ultra_end:
            return self.max_sparsity
        if t < self.restore_end:
            i, length = t - self.ultra_end, self.restore_end - self.ultra_end
            if self.restore_shape == "mirror":
                return self.max_sparsity * self._ramp(self.shape, length - i, length)
            if self.restore_shape == "cubic":
                return self.max_sparsity * (1 - i / length) ** 3
            return self.max_sparsity * (1 - self._ramp(self.restore_shape, i, length))
        return 0.0

    def phase(self, t: int) -> str:
        """The phase iteration t+1 trains in."""
        if t < self.warm_end:
            return "warmup"
        if t < self.ultra_end:
            return "ultra"
        return "restoration" if t < self.restore_end else "dense"

    def _stepped(self, t: int) -> bool:
        """The ramp that iteration t ends in changes its target in stairs (not every iteration)."""
        if t < self.warm_end:
            return self.shape == "staircase"
        restore = self.shape if self.restore_shape == "mirror" else self.restore_shape
        return self.ultra_end < t < self.restore_end and restore == "staircase"

    def is_churn(self, t: int) -> bool:
        """The update after iteration t drops and regrows weights (not only resizes to the target)."""
        return 1 <= t <= self.restore_end and t % self.update_interval == 0

    def is_update(self, t: int) -> bool:
        """Topology update after iteration t: every interval (churn), when a stair starts and at the ends of
        warm-up and restoration (resize only); none after restoration."""
        if t < 1 or t > self.restore_end:
            return False
        if self.is_churn(t) or t in (self.warm_end, self.restore_end):
            return True
        return self._stepped(t) and self.target_sparsity(t) != self.target_sparsity(t - 1)

    def drop_fraction_at(self, t: int) -> float:
        """zeta/2 (1 + cos(pi t / T_end)), T_end = the end of restoration."""
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * min(t, self.restore_end) / max(self.restore_end, 1)))

    def update_drop_fraction(self, t: int) -> float:
        """The drop fraction of the update after iteration t: 0 for a resize-only update."""
        return self.drop_fraction_at(t) if self.is_churn(t) else 0.0
