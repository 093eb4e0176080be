"""`tools/plot.py` / `megatron_eff.plotting`: loss curves from TensorBoard logs as pretrain.py writes them,
against iteration, consumed tokens or cumulative FLOPs, and the one-line errors."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_eff.plotting import cumulative_flops, piecewise_linear, read_scalars, scalar_iterations, x_of_iteration
from tests.dist_utils import ROOT

pytest.importorskip("matplotlib")
TOOL = [sys.executable, str(ROOT / "tools" / "plot.py")]
TOKENS_PER_ITER = 64


def write_run(directory, iterations=10, log_interval=2, flops=False, offset=0.0):
    """A tiny log with the tags and steps of `TrainingLogger` (+ validation every 5 iterations)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for it in range(log_interval, iterations + 1, log_interval):
        loss = 5.0 / it + offset
        writer.add_scalar("train/loss", loss, it)
        writer.add_scalar("train/consumed_tokens", it * TOKENS_PER_ITER, it)
        writer.add_scalar("train/loss_vs_tokens", loss, it * TOKENS_PER_ITER)
        if flops:
            writer.add_scalar("train/flops/actual", 1e9 * (1 + it / 10), it)  # MST: FLOPs of this iteration
        if it % 5 == 0:
            writer.add_scalar("valid/loss", loss + 0.1, it)
    if iterations % 5:  # a final validation past the last logged iteration
        writer.add_scalar("valid/loss", 1.0, iterations + 1)
    writer.close()
    return str(directory)


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (800, 500) and len(data) > min_bytes


def test_x_axes_by_hand():
    tokens = piecewise_linear(np.array([2.0, 4.0]), np.array([128.0, 256.0]))
    assert tokens([0, 1, 3, 4, 5]).tolist() == [0, 64, 192, 256, 320]  # from 0, between points, past the last
    # 1 GFLOP/iteration logged at 2, 3 GFLOP/iteration at 4: 2 * 1 + 2 * 3
    assert cumulative_flops(np.array([2.0, 4.0]), np.array([1e9, 3e9])).tolist() == [2e9, 8e9]


def test_read_scalars_and_tokens_steps_as_iterations(tmp_path):
    series = read_scalars(write_run(tmp_path / "a", iterations=11))
    assert series["train/loss"][0].tolist() == [2, 4, 6, 8, 10]
    assert series["valid/loss"][0].tolist() == [10, 12]
    assert scalar_iterations(series, "train/loss_vs_tokens", "a").tolist() == [2, 4, 6, 8, 10]


def test_cli_draws_runs_against_tokens_iterations_and_flops(tmp_path):
    from tools.plot import plot_runs

    a = write_run(tmp_path / "a" / "tensorboard", flops=True)
    b = write_run(tmp_path / "b", iterations=11, log_interval=3, offset=0.3)
    for name, args in [("tokens", [a, b]), ("flops", [a, "--x", "flops", "--logy", "--labels", "mst"])]:
        out = tmp_path / f"{name}.png"
        result = subprocess.run([*TOOL, *args, "--out", str(out)], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout == f"wrote {out}\n", result.stderr
        assert_png(out)
    out = plot_runs([a, b], str(tmp_path / "it.png"), labels=["dense", "sparse"], x="iteration",
                    scalars=["train/loss_vs_tokens", "train/loss"])
    assert out == str(tmp_path / "it.png")
    assert_png(tmp_path / "it.png")


def test_dense_run_on_the_flops_axis_takes_its_flops_per_iteration(tmp_path):
    from tools.plot import plot_runs

    mst, dense = write_run(tmp_path / "mst", flops=True), write_run(tmp_path / "dense")
    to_x = x_of_iteration(read_scalars(dense), "flops", dense, flops_per_iteration=2e9)
    assert to_x([0, 3, 10]).tolist() == [0, 6e9, 2e10]
    logged = x_of_iteration(read_scalars(mst), "flops", mst, flops_per_iteration=2e9)  # the log wins
    assert logged([2]).tolist() == [2 * 1e9 * 1.2]
    out = tmp_path / "flops.png"
    plot_runs([mst, dense], str(out), x="flops", flops_per_iteration=[None, 2e9])
    assert_png(out)
    with pytest.raises(ValueError, match="no scalar train/flops/actual"):
        plot_runs([mst, dense], str(out), x="flops", flops_per_iteration=[2e9, None])
    with pytest.raises(ValueError, match="flops_per_iteration: 1 values for 2 runs"):
        plot_runs([mst, dense], str(out), x="flops", flops_per_iteration=[2e9])


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tools.plot import main

    a = write_run(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    cases = [([a, "--scalars", "train/los"], "--scalars train/los: no run logged it"),
             ([a, "--x", "flops"], f"{a}: no scalar train/flops/actual"),
             ([a, "--labels", "x,y"], "2 labels for 1 runs"),
             ([str(tmp_path / "nope")], f"{tmp_path / 'nope'}: not a directory")]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tools/plot.py: error: ") and message in err and len(err.splitlines()) == 1, err
    # and as a user runs it
    result = subprocess.run([*TOOL, str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"tools/plot.py: error: {tmp_path / 'empty'}: no TensorBoard event files")
    assert not (tmp_path / "x.png").exists()
