"""Loss curves of runs, read from their TensorBoard logs, drawn into a PNG (the library behind `tools/plot.py`).

    from megatron_eff.plotting import plot_runs
    plot_runs(["work_dirs/a/tensorboard", "work_dirs/b/tensorboard"], "loss.png", labels=["a", "b"], x="tokens")

A run is a TensorBoard log directory as `pretrain.py --tensorboard-dir` writes it: `train/loss`, `valid/loss`
and `train/consumed_tokens` at step = iteration, `train/*_vs_tokens` at step = consumed tokens, and a method's
FLOPs of the iteration, `train/flops/actual` (MST), at step = iteration. The x axis is
- `iteration`;
- `tokens`: consumed tokens, read off `train/consumed_tokens` (linear between its points, from 0 tokens at
  iteration 0; past the last point at the last rate), so a validation at any iteration has its place;
- `flops`: cumulative training FLOPs, each logged `flops/actual` counted for the iterations since the point
  before it; a run that did not log it (a dense run) needs its constant FLOPs per iteration from the caller
  (`flops_per_iteration`, e.g. `training.flops.model_flops_per_iteration`), otherwise it is an error.
One line per run and scalar (a colour per run, a line style per scalar). A scalar that some runs did not log
(`valid/loss` without validation) is left out for them; one that no run logged is an error.
"""

from __future__ import annotations

import os

import numpy as np

X_AXES = {"iteration": "iteration", "tokens": "consumed tokens", "flops": "cumulative training FLOPs"}
DEFAULT_SCALARS = ("train/loss", "valid/loss")
TOKENS_TAG = "train/consumed_tokens"
FLOPS_TAGS = ("train/flops/actual", "flops/actual")
LINE_STYLES = ("-", "--", ":", "-.")

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # tag -> (steps, values)


def read_scalars(run: str) -> Series:
    """Every scalar of a TensorBoard log directory (all points, not TensorBoard's default sample)."""
    from tensorboard.backend.event_processing import event_accumulator

    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run}: not a directory")
    if not any(".tfevents." in name for name in os.listdir(run)):
        raise FileNotFoundError(f"{run}: no TensorBoard event files (events.out.tfevents.*)")
    events = event_accumulator.EventAccumulator(run, size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    series = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        series[tag] = (np.array([p.step for p in points], dtype=np.float64),
                       np.array([p.value for p in points], dtype=np.float64))
    return series


def piecewise_linear(xs, ys):
    """f through (0, 0) and the points (xs increasing), continued past the last one with the last slope."""
    xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[0.0], ys])

    def f(x):
        x = np.asarray(x, dtype=np.float64)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if xs[-1] > xs[-2] else 0.0
        return np.where(x <= xs[-1], np.interp(x, xs, ys), ys[-1] + slope * (x - xs[-1]))

    return f


def cumulative_flops(iterations: np.ndarray, flops_per_iteration: np.ndarray) -> np.ndarray:
    """Training FLOPs up to each logged iteration: each value counts for the iterations since the previous one."""
    return np.cumsum(flops_per_iteration * np.diff(np.concatenate([[0.0], iterations])))


def _require(series: Series, tags: tuple[str, ...], run: str, why: str) -> tuple[np.ndarray, np.ndarray]:
    for tag in tags:
        if tag in series:
            return series[tag]
    raise ValueError(f"{run}: no scalar {tags[0]} in its TensorBoard log, needed for {why}")


def x_of_iteration(series: Series, x: str, run: str, flops_per_iteration: float | None = None):
    """The function iteration -> x axis value for one run (`flops_per_iteration`: a run's constant training
    FLOPs per iteration, used for `flops` when it logged none)."""
    if x == "iteration":
        return lambda iterations: np.asarray(iterations, dtype=np.float64)
    if x == "tokens":
        return piecewise_linear(*_require(series, (TOKENS_TAG,), run, "--x tokens"))
    if flops_per_iteration is not None and not any(tag in series for tag in FLOPS_TAGS):
        return lambda iterations: np.asarray(iterations, dtype=np.float64) * flops_per_iteration
    iterations, flops = _require(series, FLOPS_TAGS, run, "--x flops (a method that counts its FLOPs, e.g. MST)")
    return piecewise_linear(iterations, cumulative_flops(iterations, flops))


def scalar_iterations(series: Series, tag: str, run: str) -> np.ndarray:
    """The iterations of a scalar's points: its steps, or for `*_vs_tokens` the iterations of those tokens."""
    steps = series[tag][0]
    if not tag.endswith("_vs_tokens"):
        return steps
    iterations, tokens = _require(series, (TOKENS_TAG,), run, f"placing {tag} (step = tokens) by iteration")
    return np.interp(steps, np.concatenate([[0.0], tokens]), np.concatenate([[0.0], iterations]))


def _label(run: str) -> str:
    """work_dirs/quickstart/tensorboard -> quickstart; other folders by their own name."""
    path = os.path.normpath(os.path.abspath(run))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "tensorboard" else name


def plot_runs(runs: list[str], out: str, labels: list[str] | None = None, x: str = "tokens",
              scalars=DEFAULT_SCALARS, logy: bool = False, flops_per_iteration: list | None = None) -> str:
    """Draw `scalars` of each run (TensorBoard log directories) against `x` into the PNG `out`; returns `out`.
    `flops_per_iteration`: per run, its constant training FLOPs per iteration or None (for `x="flops"`, runs
    that logged no `flops/actual`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise ValueError(f"--x {x!r} is not one of {', '.join(X_AXES)}")
    labels = list(labels) if labels else [_label(run) for run in runs]
    if len(labels) != len(runs):
        raise ValueError(f"--labels {','.join(labels)}: {len(labels)} labels for {len(runs)} runs")
    flops_per_iteration = list(flops_per_iteration) if flops_per_iteration else [None] * len(runs)
    if len(flops_per_iteration) != len(runs):
        raise ValueError(f"flops_per_iteration: {len(flops_per_iteration)} values for {len(runs)} runs")
    data = [read_scalars(run) for run in runs]
    for scalar in scalars:
        if not any(scalar in series for series in data):
            logged = sorted(set().union(*data))
            raise ValueError(f"--scalars {scalar}: no run logged it (they have {', '.join(logged)})")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.add_subplot()
    for color, (run, label, series, run_flops) in enumerate(zip(runs, labels, data, flops_per_iteration)):
        to_x = x_of_iteration(series, x, run, run_flops) if any(s in series for s in scalars) else None
        for style, scalar in zip(LINE_STYLES * len(scalars), scalars):
            if scalar not in series:
                continue
            values = series[scalar][1]
            ax.plot(to_x(scalar_iterations(series, scalar, run)), values, color=f"C{color % 10}", linestyle=style,
                    marker="o" if len(values) < 20 else None, markersize=3,
                    label=f"{label} {scalar}" if len(scalars) > 1 else label)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("loss" if all(s.endswith("loss") for s in scalars) else ", ".join(scalars))
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out
