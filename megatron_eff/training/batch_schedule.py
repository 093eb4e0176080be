"""Global batch sizes that change during a run (sample-based training only, as in Megatron-LM); both are pure
functions of the consumed samples, so a resumed run continues exactly where it stopped.

- `BatchRampup` (`--rampup-batch-size START INCREMENT RAMP_SAMPLES`): the global batch starts at START samples
  and grows by INCREMENT every `RAMP_SAMPLES / ((GBS - START) / INCREMENT)` consumed samples until it is
  `--global-batch-size`; from RAMP_SAMPLES on it stays there.
- `StepBatchSchedule` (`--step-batch-size-schedule "0:768 250B:1536 ..."`): the global batch is BS_i from
  T_i consumed tokens on (thresholds in tokens, suffixes K/M/B/T; the first is 0); `--global-batch-size` is
  the largest size.

    schedule = batch_size_schedule(config.train, seq_length, global_batch_size)   # None when constant
    schedule.global_batch_size_at(consumed_samples)     # this iteration's global batch
    schedule.train_iters(train_samples)                 # iterations of a --train-samples run
"""

from __future__ import annotations

from dataclasses import dataclass

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


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
        check_layout(self.sizes(), "--rampup-batch-size", micro_batch_size, data_parallel_size, multiple_of)

    def train_iters(self, train_samples: int) -> int:
        """Iterations of a `--train-samples` run, counted as Megatron-LM's update_train_iters does: the ramp
        iterations up to RAMP_SAMPLES, then whole constant batches (a partial last batch is dropped)."""
        iterations, consumed = 0, 0
        while consumed <= self.ramp_samples:
            consumed += self.global_batch_size_at(consumed)
            iterations += 1
        return iterations + max(train_samples - consumed, 0) // self.global_batch_size


@dataclass(frozen=True)
class StepBatchSchedule:
    thresholds: tuple[int, ...]  # consumed samples where each size starts (the first is 0)
    batch_sizes: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str, seq_length: int) -> StepBatchSchedule:
        """`"T0:BS0 T1:BS1 ..."`, thresholds in tokens (K/M/B/T suffixes), turned into samples of `seq_length`
        tokens (rounded up: a size starts at the first sample boundary at or past its threshold)."""
        flag = f"--step-batch-size-schedule {spec!r}"
        thresholds, sizes = [], []
        for item in spec.split():
            tokens, sep, size = item.partition(":")
            try:
                scale = _SUFFIXES.get(tokens[-1:].upper(), 1)
                count = float(tokens[:-1] if scale > 1 else tokens) * scale
                thresholds.append(-(-int(count) // seq_length))
                sizes.append(int(size))
            except ValueError:
                raise ValueError(f"{flag}: {item!r} is not TOKENS:BATCH_SIZE (e.g. 250B:1536)") from None
            if not sep or sizes[-1] < 1 or count < 0:
                raise ValueError(f"{flag}: {item!r} is not TOKENS:BATCH_SIZE with a positive batch size")
        if not thresholds or thresholds[0] != 0:
            raise ValueError(f"{flag}: the first threshold must be 0")
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"{flag}: thresholds must increase")
        return cls(tuple(thresholds), tuple(sizes))

    @property
    def global_batch_size(self) -> int:
        return max(self.batch_sizes)

    def global_batch_size_at(self, consumed_samples: int) -> int:
        size = self.batch_sizes[0]
        for threshold, batch in zip(self.thresholds, self.batch_sizes):
            if consumed_samples >= threshold:
                size = batch
        return size

    def sizes(self) -> list[int]:
        return sorted(set(self.batch_sizes))

    def check_layout(self, micro_batch_size: int, data_parallel_size: int, multiple_of: int = 1) -> None:
        check_layout(self.sizes(), "--step-batch-size-schedule", micro_batch_size, data_parallel_size, multiple_of)

    def train_iters(self, train_samples: int) -> int:
        """Iterations until `train_samples` are consumed, each of the size the schedule gives at its start; a
        partial last batch is dropped (as Megatron-LM does for a constant batch)."""
        iterations, consumed = 0, 0
        while consumed + self.global_batch_size_at(consumed) <= train_samples:
            consumed += self.global_batch_size_at(consumed)
            iterations += 1
        return iterations


def check_layout(sizes: list[int], flag: str, micro_batch_size: int, data_parallel_size: int,
                 multiple_of: int = 1) -> None:
    """Each size must be whole micro-batches of every data-parallel rank (and, for interleaved pipelining, a
    multiple of `multiple_of` micro-batches)."""
    per_step = micro_batch_size * data_parallel_size
    bad = [s for s in sizes if s % per_step or (s // per_step) % multiple_of]
    if bad:
        raise ValueError(f"{flag}: global batch size(s) {bad[:5]} of the schedule are not a multiple of "
                         f"--micro-batch-size {micro_batch_size} x data-parallel size {data_parallel_size}"
                         + (f" x {multiple_of} (interleaved pipeline)" if multiple_of > 1 else ""))


def batch_size_schedule(rampup: list[int] | None, step_schedule: str | None, seq_length: int,
                        global_batch_size: int) -> BatchRampup | StepBatchSchedule | None:
    """The run's changing batch size (None when it is constant)."""
    if rampup is not None and step_schedule is not None:
        raise ValueError("--rampup-batch-size and --step-batch-size-schedule are mutually exclusive")
    if rampup is not None:
        return BatchRampup(*rampup, global_batch_size=global_batch_size)
    if step_schedule is not None:
        return StepBatchSchedule.parse(step_schedule, seq_length)
    return None
