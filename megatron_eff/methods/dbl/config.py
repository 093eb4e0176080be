"""Dynamic batch loading's configuration and command-line flags (`--dbl-*`): README.md, "Sheared LLaMA"."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_eff.config import require


@dataclass
class DBLConfig:
    """Dynamic batch loading (Sheared LLaMA): every `update_interval` iterations the blend weights of the
    `--data-path` domains move toward the domains whose validation loss lags its reference most."""

    enabled: bool = False
    update_interval: int = 400
    """--dbl-update-interval: iterations between weight updates (the authors: 50 while pruning, 400 after)."""
    reference_loss: tuple[str, ...] = ()
    """--dbl-reference-loss: one loss per --data-path domain (in its order), or one file: JSON {domain: loss}
    or the values separated by whitespace."""
    eta: float = 1.0
    """--dbl-eta: step size of the exponentiated update."""
    smoothing: float = 1e-4
    """--dbl-smoothing: c in w = (1 - c) softmax(log w + eta delta) + c / k."""
    clip_negative: bool = False
    """--dbl-clip-negative: delta = max(loss - reference, 0) as the paper's Alg. 1 (the authors' code does not)."""

    def __post_init__(self) -> None:
        require(self.update_interval >= 1, f"--dbl-update-interval must be >= 1, got {self.update_interval}")
        require(self.eta >= 0, f"--dbl-eta must be >= 0, got {self.eta}")
        require(0 <= self.smoothing <= 1, f"--dbl-smoothing must be in [0, 1], got {self.smoothing}")
        require(not self.enabled or bool(self.reference_loss),
                "--dbl needs --dbl-reference-loss (one value per --data-path domain, or a file)")

    def check_run(self, config) -> None:
        require(not config.data.mock_data and len(config.data.data_path) >= 2,
                "--dbl needs a blended --data-path (several prefixes): it reweights the domains")
        require(config.train.eval_iters > 0, "--dbl needs --eval-iters > 0: it reads per-domain validation losses")
        require(config.data.per_domain_validation,
                "--dbl needs per-domain validation (drop --no-per-domain-validation)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Dynamic batch loading (README.md, Sheared LLaMA)")
    g.add_argument("--dbl", action="store_true",
                   help="reweight the --data-path domains by their validation loss gap to a reference")
    g.add_argument("--dbl-update-interval", type=int, default=400, help="iterations between weight updates")
    g.add_argument("--dbl-reference-loss", nargs="+", default=(), metavar="LOSS_OR_FILE",
                   help="reference loss per --data-path domain, or a file (JSON {domain: loss} or values)")
    g.add_argument("--dbl-eta", type=float, default=1.0, help="step size of the exponentiated update")
    g.add_argument("--dbl-smoothing", type=float, default=1e-4, help="mix c of the uniform weights")
    g.add_argument("--dbl-clip-negative", action="store_true",
                   help="clip the loss gap at 0 (the paper's Alg. 1; default: the authors' code, unclipped)")


def config_from_args(args: argparse.Namespace) -> DBLConfig:
    return DBLConfig(enabled=args.dbl, update_interval=args.dbl_update_interval,
                     reference_loss=tuple(args.dbl_reference_loss), eta=args.dbl_eta, smoothing=args.dbl_smoothing,
                     clip_negative=args.dbl_clip_negative)
