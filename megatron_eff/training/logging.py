"""Progress lines and TensorBoard scalars: loss, lr, grad norm, tokens/s, TFLOP/s, MFU, ETA.

One `TrainingLogger` per run; only the rank that holds the loss (the last pipeline stage's first TP/DP
rank) prints and writes TensorBoard, so logs are not repeated per rank.
"""

from __future__ import annotations

import math
import sys
import time

import torch

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


def log(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, flush=True, file=sys.stdout)


class TrainingLogger:
    def __init__(self, *, enabled: bool, tensorboard_dir: str | None, train_iters: int, world_size: int,
                 peak_tflops: float | None):
        self.enabled, self.train_iters = enabled, train_iters
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._window_start = time.perf_counter()
        self._window_iters = 0
        self._window_tokens = 0
        self._window_flops = 0.0
        self._losses: list[float] = []

    def record(self, loss: float, tokens: int, flops: float) -> None:
        """Account one finished iteration into the current logging window."""
        self._window_iters += 1
        self._window_tokens += tokens
        self._window_flops += flops
        if math.isfinite(loss):
            self._losses.append(loss)

    def flush(self, iteration: int, consumed_tokens: int, lr: float, grad_norm: float,
              extra: dict[str, float] | None = None) -> dict[str, float]:
        """Print one line for the window since the last flush and write the scalars; returns them."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        iters = max(self._window_iters, 1)
        scalars = {
            "loss": sum(self._losses) / len(self._losses) if self._losses else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": self._window_tokens / elapsed,
            "tflops_per_device": self._window_flops / elapsed / 1e12 / self.world_size,
            "iteration_time_ms": 1000 * elapsed / iters,
        }
        if self.peak_tflops:
            scalars["mfu"] = scalars["tflops_per_device"] / self.peak_tflops
        scalars.update(extra or {})
        eta = (self.train_iters - iteration) * elapsed / iters
        parts = [
            f"iter {iteration:>7d}/{self.train_iters}",
            f"tokens {consumed_tokens:>11,d}",
            f"loss {scalars['loss']:.4f}",
            f"lr {lr:.3e}",
            f"grad_norm {grad_norm:.3f}",
            f"tok/s {scalars['tokens_per_sec']:,.0f}",
            f"TFLOP/s/dev {scalars['tflops_per_device']:.3g}",
        ]
        if "mfu" in scalars:
            parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
        parts += [f"{k} {v:.4g}" for k, v in (extra or {}).items()]
        parts += [f"{scalars['iteration_time_ms']:.0f} ms/it", f"ETA {format_duration(eta)}"]
        log(" | ".join(parts), self.enabled)
        self.scalars(iteration, {f"train/{k}": v for k, v in scalars.items()})
        self._window_start, self._window_iters, self._window_tokens = time.perf_counter(), 0, 0
        self._window_flops, self._losses = 0.0, []
        return scalars

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
