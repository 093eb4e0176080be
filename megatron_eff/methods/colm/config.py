"""CoLM's configuration and command-line flags (`--colm`, `--colm-*`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_eff.config import require

SIMILARITIES = ("l1", "cosine")


@dataclass
class ColmConfig:
    """CoLM: mini-batch coresets (Nguyen et al. 2024; README.md, "CoLM — mini-batch coresets"). Each iteration
    draws `large_batch_size` candidates and trains on a coreset of `--global-batch-size` of them."""

    enabled: bool = False
    large_batch_size: int | None = None
    """B_L: candidates drawn per iteration (default: 2 x --global-batch-size, the paper's 128 / 64)."""
    keep_sources: tuple[str, ...] = ()
    """Sources (--data-path domains, by index or by name) whose candidates always enter the coreset."""
    keep_small_sources: bool = False
    """Also keep every source whose blend weight is below the average (1 / number of sources) whole."""
    zo_eps: float = 1e-3
    """epsilon of the two-sided zeroth-order difference along z."""
    zo_dim: int = 2560
    """Coordinates of the Adam-normalised sketch kept per source (largest |mean|) before facility location."""
    zo_resample: bool = False
    """Draw a fresh z (shared by all candidates and ranks) every iteration instead of one z for the run."""
    zo_seed: int | None = None
    """Seed of z (default: --seed + 1)."""
    similarity: str = "l1"
    """Facility-location similarity: l1 (max(D) - D, D the pairwise L1 distance) or cosine (1 + cos)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.large_batch_size is not None:
            require(self.large_batch_size >= 1, f"--colm-large-batch-size must be >= 1, got {self.large_batch_size}")
        require(self.zo_eps > 0, f"--colm-zo-eps must be > 0, got {self.zo_eps}")
        require(self.zo_dim >= 1, f"--colm-zo-dim must be >= 1, got {self.zo_dim}")
        require(self.similarity in SIMILARITIES,
                f"--colm-similarity must be one of {', '.join(SIMILARITIES)}, got {self.similarity!r}")
        for flag, beta in (("--colm-adam-beta1", self.adam_beta1), ("--colm-adam-beta2", self.adam_beta2)):
            require(0 <= beta < 1, f"{flag} must be in [0, 1), got {beta}")
        require(self.adam_eps > 0, f"--colm-adam-eps must be > 0, got {self.adam_eps}")

    def resolved_large_batch_size(self, global_batch_size: int) -> int:
        return self.large_batch_size or 2 * global_batch_size

    def samples_per_iteration(self, global_batch_size: int) -> int:
        """Samples read from the training set per iteration (the trainer sizes the dataset with it)."""
        return self.resolved_large_batch_size(global_batch_size)

    def check_run(self, config) -> None:
        """Rules that need the batch shape (`config`: the run's `Config`); divisibility by the data-parallel
        size is checked when the method is built."""
        train = config.train
        gbs = train.global_batch_size or train.micro_batch_size
        large = self.resolved_large_batch_size(gbs)
        require(large >= gbs, f"--colm-large-batch-size {large} must be >= --global-batch-size {gbs} (the coreset)")
        require(large % train.micro_batch_size == 0,
                f"--colm-large-batch-size {large} must be a multiple of --micro-batch-size {train.micro_batch_size}")
        require(not train.calculate_per_token_loss,
                "--colm trains on the plain mean loss of the coreset; drop --calculate-per-token-loss")
        require(config.parallel.context_parallel_size == 1,
                "--colm scores whole samples; with --context-parallel-size > 1 each rank sees only its positions "
                "(not supported yet: use --context-parallel-size 1)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("CoLM: mini-batch coresets (README.md, section CoLM)")
    g.add_argument("--colm", action="store_true",
                   help="train on a coreset of --global-batch-size chosen from --colm-large-batch-size candidates")
    g.add_argument("--colm-large-batch-size", type=int,
                   help="B_L: candidates drawn per iteration (default: 2 x --global-batch-size)")
    g.add_argument("--colm-keep-sources", type=_names, default=(), metavar="I,J|NAME,...",
                   help="--data-path domains (index or prefix basename) whose candidates are always kept")
    g.add_argument("--colm-keep-small-sources", action="store_true",
                   help="also keep whole every domain whose blend weight is below the average")
    g.add_argument("--colm-zo-eps", type=float, default=1e-3, help="zeroth-order difference step epsilon")
    g.add_argument("--colm-zo-dim", type=int, default=2560,
                   help="sketch coordinates kept per source (largest |mean|) before facility location")
    g.add_argument("--colm-zo-resample", action="store_true",
                   help="a fresh shared z every iteration (default: one z for the whole run, as the authors)")
    g.add_argument("--colm-zo-seed", type=int, help="seed of z (default: --seed + 1)")
    g.add_argument("--colm-similarity", choices=SIMILARITIES, default="l1",
                   help="facility-location similarity between sketches")
    g.add_argument("--colm-adam-beta1", type=float, default=0.9, help="beta1 of the sketch's Adam normalisation")
    g.add_argument("--colm-adam-beta2", type=float, default=0.999, help="beta2 of the sketch's Adam normalisation")
    g.add_argument("--colm-adam-eps", type=float, default=1e-8, help="epsilon of the sketch's Adam normalisation")


def config_from_args(args: argparse.Namespace) -> ColmConfig:
    return ColmConfig(
        enabled=args.colm, large_batch_size=args.colm_large_batch_size, keep_sources=tuple(args.colm_keep_sources),
        keep_small_sources=args.colm_keep_small_sources, zo_eps=args.colm_zo_eps, zo_dim=args.colm_zo_dim,
        zo_resample=args.colm_zo_resample, zo_seed=args.colm_zo_seed, similarity=args.colm_similarity,
        adam_beta1=args.colm_adam_beta1, adam_beta2=args.colm_adam_beta2, adam_eps=args.colm_adam_eps,
    )
