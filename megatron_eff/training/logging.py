"""Progress lines and TensorBoard scalars: loss, lr, grad norm, tokens/s, TFLOP/s, MFU, ETA, consumed
samples/tokens, FP16 loss scale, skipped iterations.

One `TrainingLogger` per run; only the rank that holds the loss (the last pipeline stage's first TP/DP
rank) prints and writes TensorBoard, so logs are not repeated per rank. Like Megatron-LM's interval timer,
the throughput window leaves out the time spent in `paused()` (validation, checkpoint saves).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_eff.training.checkpointing import TrainState

# Dense BF16 peak per device, TFLOP/s, for MFU when --peak-tflops is not given.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def guess_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _now() -> float:
    """Seconds on a monotonic clock, after the device's queued work (so a window owns its kernels)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def log(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, flush=True, file=sys.stdout)


class TrainingLogger:
    def __init__(self, *, enabled: bool, tensorboard_dir: str | None, train_iters: int, world_size: int,
                 peak_tflops: float | None, seq_length: int):
        self.enabled, self.train_iters, self.seq_length = enabled, train_iters, seq_length
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._run_iters, self._run_paused = 0, 0.0  # for the ETA: validation/save seconds per iteration
        self._reset_window(_now())

    def _reset_window(self, start: float) -> None:
        self._window_start, self._window_paused = start, 0.0
        self._window_iters, self._window_tokens, self._window_flops, self._window_skipped = 0, 0, 0.0, 0
        self._losses: list[float] = []

    def record(self, loss: float, tokens: int, flops: float, skipped: bool = False) -> None:
        """Account one finished iteration into the current logging window."""
        self._run_iters += 1
        self._window_iters += 1
        self._window_tokens += tokens
        self._window_flops += flops
        self._window_skipped += int(skipped)
        if math.isfinite(loss):
            self._losses.append(loss)

    @contextlib.contextmanager
    def paused(self):
        """Leave the enclosed time (validation, a checkpoint save) out of tokens/s, TFLOP/s, MFU and ms/it."""
        start = _now()
        try:
            yield
        finally:
            seconds = _now() - start
            self._window_paused += seconds
            self._run_paused += seconds

    def flush(self, state: TrainState, lr: float, grad_norm: float, loss_scale: float | None = None,
              extra: dict[str, float] | None = None) -> dict[str, float]:
        """Print one line for the window since the last flush and write the scalars; returns them.
        `loss_scale`: the FP16 loss scaler's scale (None without --fp16)."""
        now = _now()  # the end of this window and the start of the next
        elapsed = max(now - self._window_start - self._window_paused, 1e-9)  # training time only
        consumed_tokens = state.consumed_train_samples * self.seq_length
        iters, iteration = max(self._window_iters, 1), state.iteration
        scalars = {
            "loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": self._window_tokens / elapsed,
            "tflops_per_device": self._window_flops / elapsed / 1e12 / self.world_size,
            "iteration_time_ms": 1000 * elapsed / iters,
            "consumed_samples": state.consumed_train_samples,
            "consumed_tokens": consumed_tokens,
            "skipped_iterations": self._window_skipped,
        }
        if self.peak_tflops:
            scalars["mfu"] = scalars["tflops_per_device"] / self.peak_tflops
        if loss_scale is not None:
            scalars["loss_scale"] = loss_scale
        scalars.update(extra or {})
        # Remaining iterations at this window's speed, plus the run's validation/save time per iteration so far.
        eta = (self.train_iters - iteration) * (elapsed / iters + self._run_paused / max(self._run_iters, 1))
        log(self._line(iteration, scalars, extra or {}, eta), self.enabled)
        self.scalars(iteration, {f"train/{k}": v for k, v in scalars.items()})
        self.scalars(consumed_tokens, {"train/loss_vs_tokens": scalars["loss"], "train/lr_vs_tokens": lr})
        self._reset_window(now)
        return scalars

    def _line(self, iteration: int, scalars: dict[str, float], extra: dict[str, float], eta: float) -> str:
        parts = [
            f"iter {iteration:>7d}/{self.train_iters}",
            f"samples {scalars['consumed_samples']:>9,d}",
            f"tokens {scalars['consumed_tokens']:>11,d}",
            f"loss {scalars['loss']:.4f}",
            f"lr {scalars['lr']:.3e}",
        ]
        if "loss_scale" in scalars:
            parts.append(f"loss_scale {scalars['loss_scale']:g}")
        parts.append(f"grad_norm {scalars['grad_norm']:.3f}")
        if scalars["skipped_iterations"]:
            parts.append(f"skipped {scalars['skipped_iterations']}")
        parts += [f"tok/s {scalars['tokens_per_sec']:,.0f}", f"TFLOP/s/dev {scalars['tflops_per_device']:.3g}"]
        if "mfu" in scalars:
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        parts += [f"{k} {v:.4g}" for k, v in extra.items()]
        parts += [f"{scalars['iteration_time_ms']:.0f} ms/it", f"ETA {format_duration(eta)}"]
        return " | ".join(parts)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
