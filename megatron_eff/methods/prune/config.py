"""Pruning's configuration and command-line flags (`--prune-*`): README.md, "Sheared LLaMA"."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_eff.config import require

MODULES = ("layer", "head", "ffn", "hidden")  # the masks, in the order they are reported


@dataclass
class PruneConfig:
    """Targeted structured pruning with hard-concrete (L0) masks and a Lagrangian (Sheared LLaMA). A target
    left unset (or equal to the source) leaves that module unmasked."""

    enabled: bool = False
    target_num_layers: int | None = None
    """--prune-target-num-layers: layers the pruned model keeps."""
    target_hidden_size: int | None = None
    """--prune-target-hidden-size: hidden dims (residual stream width) the pruned model keeps."""
    target_num_attention_heads: int | None = None
    """--prune-target-num-attention-heads: query heads kept per layer. With GQA whole query groups are pruned
    (a group's query heads with their K/V), so it must be a multiple of the heads per group."""
    target_ffn_hidden_size: int | None = None
    """--prune-target-ffn-hidden-size: MLP channels kept per layer."""
    lagrangian_warmup: float = 0.2
    """--prune-lagrangian-warmup: fraction of --train-iters over which the target sparsities ramp from 0."""
    mask_lr: float = 1.0
    """--prune-mask-lr: peak LR of the mask logits (log alpha), under the run's LR schedule."""
    lambda_lr: float = 1.0
    """--prune-lambda-lr: peak LR of the Lagrange multipliers (gradient ascent), under the run's schedule."""
    eval_target_shape: bool = False
    """--prune-eval-target-shape: validation keeps exactly the target counts (what extraction keeps); by
    default (the authors' pruning runs) it keeps the current expected counts."""

    def __post_init__(self) -> None:
        for flag, value in (("--prune-target-num-layers", self.target_num_layers),
                            ("--prune-target-hidden-size", self.target_hidden_size),
                            ("--prune-target-num-attention-heads", self.target_num_attention_heads),
                            ("--prune-target-ffn-hidden-size", self.target_ffn_hidden_size)):
            require(value is None or value >= 1, f"{flag} must be >= 1, got {value}")
        require(0 <= self.lagrangian_warmup <= 1,
                f"--prune-lagrangian-warmup must be in [0, 1], got {self.lagrangian_warmup}")
        require(self.mask_lr >= 0, f"--prune-mask-lr must be >= 0, got {self.mask_lr}")
        require(self.lambda_lr >= 0, f"--prune-lambda-lr must be >= 0, got {self.lambda_lr}")

    def check_run(self, config) -> None:
        """Targets against the model shape, and the parts of a run pruning does not support."""
        model = config.model
        pairs = (("--prune-target-num-layers", self.target_num_layers, "--num-layers", model.num_layers),
                 ("--prune-target-hidden-size", self.target_hidden_size, "--hidden-size", model.hidden_size),
                 ("--prune-target-num-attention-heads", self.target_num_attention_heads, "--num-attention-heads",
                  model.num_attention_heads),
                 ("--prune-target-ffn-hidden-size", self.target_ffn_hidden_size, "--ffn-hidden-size",
                  model.ffn_hidden_size))
        for flag, target, source_flag, source in pairs:
            require(target is None or target <= source,
                    f"{flag} {target} is larger than the model's {source_flag} {source}")
        require(any(t is not None and t < s for _, t, _, s in pairs),
                "--prune needs at least one target smaller than the model (--prune-target-num-layers, "
                "--prune-target-hidden-size, --prune-target-num-attention-heads, --prune-target-ffn-hidden-size)")
        per_group = model.num_attention_heads // model.num_query_groups
        if self.target_num_attention_heads is not None:
            require(self.target_num_attention_heads % per_group == 0,
                    f"--prune-target-num-attention-heads {self.target_num_attention_heads} must be a multiple of "
                    f"the query heads per group ({per_group}): GQA prunes whole query groups")
        require(not model.recompute_activations,
                "--prune does not support --recompute-activations (the masks are drawn once per forward)")
        require(model.transformer_impl == "local", "--prune needs --transformer-impl local")

    def targets(self, model) -> dict[str, tuple[int, int]]:
        """{module: (source count, target count)} per pruned module (per layer for head and ffn; heads are
        counted as query groups)."""
        per_group = model.num_attention_heads // model.num_query_groups
        wanted = {"layer": (model.num_layers, self.target_num_layers),
                  "head": (model.num_query_groups,
                           None if self.target_num_attention_heads is None
                           else self.target_num_attention_heads // per_group),
                  "ffn": (model.ffn_hidden_size, self.target_ffn_hidden_size),
                  "hidden": (model.hidden_size, self.target_hidden_size)}
        return {m: (s, t) for m, (s, t) in wanted.items() if t is not None and t < s}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Pruning: Sheared LLaMA targeted structured pruning (README.md, Sheared LLaMA)")
    g.add_argument("--prune", action="store_true",
                   help="learn hard-concrete masks that prune the model to the --prune-target-* shape")
    g.add_argument("--prune-target-num-layers", type=int, help="layers to keep (default: all)")
    g.add_argument("--prune-target-hidden-size", type=int, help="hidden dims to keep (default: all)")
    g.add_argument("--prune-target-num-attention-heads", type=int,
                   help="query heads to keep per layer; GQA prunes whole query groups (default: all)")
    g.add_argument("--prune-target-ffn-hidden-size", type=int, help="MLP channels to keep per layer (default: all)")
    g.add_argument("--prune-lagrangian-warmup", type=float, default=0.2,
                   help="fraction of --train-iters over which the targets ramp from the source shape")
    g.add_argument("--prune-mask-lr", type=float, default=1.0, help="peak LR of the mask logits")
    g.add_argument("--prune-lambda-lr", type=float, default=1.0,
                   help="peak LR of the Lagrange multipliers (gradient ascent)")
    g.add_argument("--prune-eval-target-shape", action="store_true",
                   help="validate with exactly the target counts kept (default: the expected counts)")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        enabled=args.prune, target_num_layers=args.prune_target_num_layers,
        target_hidden_size=args.prune_target_hidden_size,
        target_num_attention_heads=args.prune_target_num_attention_heads,
        target_ffn_hidden_size=args.prune_target_ffn_hidden_size, lagrangian_warmup=args.prune_lagrangian_warmup,
        mask_lr=args.prune_mask_lr, lambda_lr=args.prune_lambda_lr, eval_target_shape=args.prune_eval_target_shape,
    )
