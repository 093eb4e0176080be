"""Draw loss curves of runs from their TensorBoard logs into a PNG.

    python tools/plot.py work_dirs/quickstart/tensorboard work_dirs/mst/tensorboard --out loss.png \\
        --labels dense,mst [--x tokens|iteration|flops] [--scalars train/loss,valid/loss] [--logy]

Each RUN_DIR is a `pretrain.py --tensorboard-dir` folder. `--x tokens` (default) places every point at the
tokens consumed by then (from `train/consumed_tokens`), `--x flops` at the cumulative training FLOPs of a
method that logs them (`flops/actual`, MST), `--x iteration` at the iteration. One line per run and scalar.
A folder without event files, a scalar that no run logged or a run without what `--x` needs is one line
`tools/plot.py: error: ...`, exit status 2. The function behind it, for benchmarks:
`from tools.plot import plot_runs` (or `megatron_eff.plotting`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eff.plotting import DEFAULT_SCALARS, X_AXES, plot_runs  # noqa: E402

__all__ = ["main", "plot_runs"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/plot.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="TensorBoard log directories, one per run")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--labels", help="comma-separated legend names, one per run (default: the folder names)")
    parser.add_argument("--x", default="tokens", choices=list(X_AXES), help="x axis (default: tokens)")
    parser.add_argument("--scalars", default=",".join(DEFAULT_SCALARS),
                        help="comma-separated TensorBoard tags (default: %(default)s)")
    parser.add_argument("--logy", action="store_true", help="log-scale y axis")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    scalars = [s for s in args.scalars.split(",") if s]
    try:
        plot_runs(args.runs, args.out, labels=labels, x=args.x, scalars=scalars, logy=args.logy)
    except (ValueError, FileNotFoundError) as error:
        print(f"tools/plot.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
