"""The ladder omission-rate scheduler (LORS): a constant omission rate, then K equal steps down to dense.

    rho(t) = rho0                                   t < S
             rho0 * (K - 1 - floor(K (t - S) / L)) / K   S <= t < E   (L = E - S; stair j lasts L / K)
             0                                      t >= E

with S = round(start * T), E = round(end * T), T = --train-iters and t the number of completed iterations
(iteration `it`, 1-based, trains at rho(it - 1)). The first step down is at S, each of the K stairs lasts
L / K iterations, and the last stair is already dense, so the ladder ends dense whatever `end` is; iterations
from E on are a dense tail. The paper confirms the two stages (constant, then gradually denser until dense);
the stair count and positions are our choice (flags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LadderSchedule:
    rate: float  # rho0
    start: int  # S, iterations
    end: int  # E, iterations
    steps: int  # K

    @classmethod
    def from_fractions(cls, rate: float, start: float, end: float, steps: int, train_iters: int) -> LadderSchedule:
        return cls(rate, round(start * train_iters), round(end * train_iters), steps)

    def __call__(self, t: int) -> float:
        """The omission rate after `t` completed iterations."""
        if t < self.start:
            return self.rate
        if t >= self.end:
            return 0.0
        stair = math.floor(self.steps * (t - self.start) / (self.end - self.start))
        return self.rate * (self.steps - 1 - stair) / self.steps

    def boundaries(self) -> list[int]:
        """The iterations t where a stair starts (the first at S)."""
        length = self.end - self.start
        return [self.start + math.ceil(j * length / self.steps) for j in range(self.steps)] if length else []
