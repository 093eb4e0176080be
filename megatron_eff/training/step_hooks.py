"""Per-iteration housekeeping Megatron-LM launch scripts ask for: manual garbage collection (`--manual-gc`)
and a torch.profiler trace of a few iterations (`--profile`); and, with `--torch-compile`, one log line with
the first iteration's time, which includes compiling. Each is a no-op unless its flag is given.

    hooks = StepHooks(config, rank)
    hooks.before_iteration(iteration); ...step...; hooks.after_iteration(iteration); hooks.close()
"""

from __future__ import annotations

import gc
import os
import time

import torch

from megatron_eff.config import Config
from megatron_eff.training.logging import log


class StepHooks:
    def __init__(self, config: Config, rank: int):
        train, logging = config.train, config.logging
        self.gc_interval = train.manual_gc_interval if train.manual_gc else None
        if self.gc_interval is not None:
            gc.disable()  # Python's collector then never pauses a step at a random point
            gc.collect()
        self.profile = logging.profile and rank in logging.profile_ranks
        self.profile_start, self.profile_end = logging.profile_step_start, logging.profile_step_end
        self.trace_dir = os.path.join(logging.tensorboard_dir or "profile", f"trace_rank{rank}")
        self.profiler: torch.profiler.profile | None = None
        self.trace_file: str | None = None
        self.time_first_iteration = config.train.torch_compile and rank == 0
        self.iteration_start = 0.0

    def before_iteration(self, iteration: int) -> None:
        self.iteration_start = time.perf_counter()
        if self.profile and self.profiler is None and iteration == self.profile_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def after_iteration(self, iteration: int) -> None:
        if self.time_first_iteration:  # the first iteration of this process (also after a resume)
            self.time_first_iteration = False
            log(f"torch.compile: first iteration took {time.perf_counter() - self.iteration_start:.1f} s (compiling "
                "included, and in the first logging window's tokens/s and ms/it)", True)
        if self.profiler is not None and iteration + 1 >= self.profile_end:
            self._write_trace()
        if self.gc_interval and iteration % self.gc_interval == 0:
            gc.collect()

    def _write_trace(self) -> None:
        self.profiler.__exit__(None, None, None)
        os.makedirs(self.trace_dir, exist_ok=True)
        self.trace_file = os.path.join(self.trace_dir,
                                       f"iterations_{self.profile_start}-{self.profile_end - 1}.pt.trace.json")
        self.profiler.export_chrome_trace(self.trace_file)
        self.profiler = None
        self.profile = False  # one trace per run

    def close(self) -> None:
        """A run that ends inside the profiled range still writes its trace; automatic GC back on."""
        if self.profiler is not None:
            self._write_trace()
        if self.gc_interval is not None:
            gc.enable()
