"""Batch-size ramp-up (Megatron-LM's `--rampup-batch-size START INCREMENT RAMP_SAMPLES`): the global batch starts
at START samples and grows by INCREMENT every `RAMP_SAMPLES / ((GBS - START) / INCREMENT)` consumed samples
until it is `--global-batch-size`; from RAMP_SAMPLES on it stays there. A pure function of the consumed
samples, so a resumed run continues the ramp exactly where it stopped.

    ramp = BatchRampup(start=16, increment=16, ramp_samples=5_859_375, global_batch_size=1536)
    ramp.global_batch_size_at(consumed_samples)     # this iteration's global batch
    ramp.train_iters(train_samples)                 # iterations of a --train-samples run (Megatron's count)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchRampup:
    start: int
    increment: int
    ramp_samples: int
    global_batch_size: int

    def __post_init__(self) -> None:
        flag = f"--rampup-batch-size {self.start} {self.increment} {self.ramp_samples}"
        if self.start < 1 or self.increment < 1 or self.ramp_samples < 0:
            raise ValueError(f"{flag}: the start and increment must be positive and the ramp samples >= 0")
        diff = self.global_batch_size - self.start
        if diff < 0 or diff % self.increment:
            raise ValueError(f"{flag}: --global-batch-size {self.global_batch_size} minus the start must be a "
                             "non-negative multiple of the increment")

    @property
    def samples_per_increment(self) -> float:
        increments = (self.global_batch_size - self.start) // self.increment
        return self.ramp_samples / increments if increments else float("inf")

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update at `consumed_samples`."""
        if consumed_samples > self.ramp_samples:
            return self.global_batch_size
        steps = int(consumed_samples / self.samples_per_increment)
        return min(self.start + steps * self.increment, self.global_batch_size)

    def sizes(self) -> list[int]:
        """Every global batch size the ramp uses, in order."""
        return list(range(self.start, self.global_batch_size + 1, self.increment))

    def check_layout(self, micro_batch_size: int, data_parallel_size: int, multiple_of: int = 1) -> None:
        """Each size must be whole micro-batches of every data-parallel rank (and, for interleaved
        pipelining, a multiple of `multiple_of` micro-batches)."""
        per_step = micro_batch_size * data_parallel_size
        bad = [s for s in self.sizes() if s % per_step or (s // per_step) % multiple_of]
        if bad:
            raise ValueError(f"--rampup-batch-size: global batch size(s) {bad[:5]} of the ramp are not a multiple "
                             f"of --micro-batch-size {micro_batch_size} x data-parallel size {data_parallel_size}"
                             + (f" x {multiple_of} (interleaved pipeline)" if multiple_of > 1 else ""))

    def train_iters(self, train_samples: int) -> int:
        """Iterations of a `--train-samples` run, counted as Megatron-LM's update_train_iters does: the ramp
        iterations up to RAMP_SAMPLES, then whole constant batches (a partial last batch is dropped)."""
        iterations, consumed = 0, 0
        while consumed <= self.ramp_samples:
            consumed += self.global_batch_size_at(consumed)
            iterations += 1
        return iterations + max(train_samples - consumed, 0) // self.global_batch_size
