"""SAT's configuration and command-line flags (`--sat-*`). Every default below is our choice: the paper's
values are not published (README.md, "SAT -- Sparsity-Accelerated Training")."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_eff.config import require

IMPORTANCE = ("wanda", "ema", "magnitude", "random")
SELECTION = ("topk", "sample")
HEAD_UNITS = ("query-head", "kv-group")


@dataclass
class SATConfig:
    """Sparsity-accelerated training (`--sat-*`): omit the least important attention heads (with GQA: single
    query heads, K/V dense, or whole query groups) and MLP channels each step, on a ladder omission-rate
    schedule (LORS) that ends dense."""

    enabled: bool = False
    omission_rate_mlp: float = 0.5  # rho_c: fraction of MLP channels omitted before the ladder
    omission_rate_heads: float = 0.25  # rho_h: fraction of head units omitted before the ladder
    head_unit: str = "query-head"  # GQA: query-head (K/V dense) | kv-group (a group's q heads with its K and V)
    lors_start: float = 0.5  # fraction of --train-iters where the ladder starts
    lors_end: float = 1.0  # fraction of --train-iters where the ladder ends (dense from here on)
    lors_steps: int = 4  # K equal steps from rho down to 0 over [start, end)
    importance: str = "wanda"  # wanda | ema | magnitude | random
    selection: str = "topk"  # topk | sample (without replacement, proportional to the score)
    exempt_layers: tuple[str, ...] = ("first",)  # global layer indices, or "first" / "last": always dense
    freeze_omitted: bool = True  # omitted rows keep their values and AdamW moments that step
    ema_decay: float = 0.9  # EMA of the input statistics (wanda) and output norms (ema)
    balance_blocks: int = 0  # blocks that each keep the same count; 0 = the TP size

    def __post_init__(self) -> None:
        for flag, rate in (("--sat-omission-rate-mlp", self.omission_rate_mlp),
                           ("--sat-omission-rate-heads", self.omission_rate_heads)):
            require(0 <= rate < 1, f"{flag} must be in [0, 1), got {rate}")
        require(0 <= self.lors_start <= self.lors_end <= 1,
                f"--sat-lors-start {self.lors_start} and --sat-lors-end {self.lors_end} must satisfy "
                f"0 <= start <= end <= 1")
        require(self.lors_steps >= 1, f"--sat-lors-steps must be >= 1, got {self.lors_steps}")
        require(self.importance in IMPORTANCE, f"--sat-importance must be one of {IMPORTANCE}, got {self.importance!r}")
        require(self.head_unit in HEAD_UNITS,
                f"--sat-head-unit must be one of {HEAD_UNITS}, got {self.head_unit!r}")
        require(self.selection in SELECTION, f"--sat-selection must be one of {SELECTION}, got {self.selection!r}")
        require(0 <= self.ema_decay < 1, f"--sat-ema-decay must be in [0, 1), got {self.ema_decay}")
        require(self.balance_blocks >= 0, f"--sat-balance-blocks must be >= 0, got {self.balance_blocks}")
        for item in self.exempt_layers:
            require(item in ("first", "last") or item.lstrip("-").isdigit(),
                    f"--sat-exempt-layers takes layer indices, 'first' or 'last' (comma-separated), or 'none' "
                    f"alone, got {item!r}")

    def exempt_indices(self, num_layers: int) -> set[int]:
        """The global layer indices that stay dense."""
        named = {"first": 0, "last": num_layers - 1}
        return {named[i] if i in named else int(i) % num_layers for i in self.exempt_layers}

    def blocks(self, tp_size: int) -> int:
        return self.balance_blocks or tp_size

    def omits_query_heads(self, model) -> bool:
        """Whether the head unit is a single query head with K/V dense (`--sat-head-unit query-head` under GQA;
        with MHA a query head is its own group, and omitting the group also skips its K and V)."""
        return self.head_unit == "query-head" and model.num_attention_heads > model.num_query_groups

    def check_run(self, config) -> None:
        """Rules that need the model shape, the layout and the other methods (`config`: the run's `Config`)."""
        model, tp = config.model, config.parallel.tensor_model_parallel_size
        require(model.transformer_impl == "local",
                "--sat needs --transformer-impl local (it gathers rows of the local backend's linears; "
                f"Transformer Engine's modules have fixed sizes), got {model.transformer_impl!r}")
        require(not config.precision.fp8_param_gather,
                "--sat cannot be combined with --fp8-param-gather (SAT's GEMMs take selected rows/columns of the "
                "weights; the FP8 weight copy is the whole tensor)")
        require("mst" not in config.enabled_methods(),
                "--sat and --mst cannot be combined (MST's weight masks and SAT's omitted rows are not defined "
                "together)")
        blocks = self.blocks(tp)
        require(blocks % tp == 0, f"--sat-balance-blocks {blocks} must be a multiple of "
                                  f"--tensor-model-parallel-size {tp}")
        if self.omits_query_heads(model):
            require(model.num_attention_heads % blocks == 0,
                    f"--sat-balance-blocks {blocks} must divide --num-attention-heads {model.num_attention_heads}")
        else:
            require(model.num_query_groups % blocks == 0,
                    f"--sat-balance-blocks {blocks} must divide the number of query groups {model.num_query_groups}")
        require(model.ffn_hidden_size % blocks == 0,
                f"--sat-balance-blocks {blocks} must divide --ffn-hidden-size {model.ffn_hidden_size}")
        for item in self.exempt_layers:
            if item not in ("first", "last"):
                require(-model.num_layers <= int(item) < model.num_layers,
                        f"--sat-exempt-layers: layer {item} is not in [0, --num-layers {model.num_layers})")


def _names(text: str) -> tuple[str, ...]:
    return () if text.strip() == "none" else tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SAT: sparsity-accelerated training (README.md, section SAT)")
    g.add_argument("--sat", action="store_true",
                   help="omit unimportant heads and MLP channels each step (really smaller GEMMs), ladder to dense")
    g.add_argument("--sat-omission-rate-mlp", type=float, default=0.5,
                   help="rho_c: fraction of MLP channels omitted until the ladder starts")
    g.add_argument("--sat-omission-rate-heads", type=float, default=0.25,
                   help="rho_h: fraction of attention head units (see --sat-head-unit) omitted until the ladder "
                        "starts")
    g.add_argument("--sat-head-unit", choices=HEAD_UNITS, default="query-head",
                   help="under GQA, the head unit omitted: query-head (single query heads; K/V of every group stay "
                        "dense) or kv-group (a query group's heads with its K and V); the same with MHA")
    g.add_argument("--sat-lors-start", type=float, default=0.5,
                   help="fraction of --train-iters where the ladder starts")
    g.add_argument("--sat-lors-end", type=float, default=1.0,
                   help="fraction of --train-iters where the ladder ends; dense from there on")
    g.add_argument("--sat-lors-steps", type=int, default=4,
                   help="K: equal steps from rho down to 0 between start and end (the last step is dense)")
    g.add_argument("--sat-importance", choices=IMPORTANCE, default="wanda",
                   help="unit score: wanda (|W| x input norms), ema (output norms of earlier steps), magnitude, random")
    g.add_argument("--sat-selection", choices=SELECTION, default="topk",
                   help="keep the top-scored units, or sample them in proportion to the score without replacement")
    g.add_argument("--sat-exempt-layers", type=_names, default=("first",), metavar="I,J|first,last|none",
                   help="global layer indices (or first / last) that are always dense; none: every layer omits "
                        "(default first: omitting in the first layer cost most of SAT's quality in our bench)")
    g.add_argument("--sat-freeze-omitted", action=argparse.BooleanOptionalAction, default=True,
                   help="omitted rows keep their weights and AdamW moments that step (no momentum/decay move)")
    g.add_argument("--sat-ema-decay", type=float, default=0.9,
                   help="decay of the running input statistics (wanda) and output norms (ema)")
    g.add_argument("--sat-balance-blocks", type=int, default=0,
                   help="units are chosen in this many equal blocks, each keeping the same count (0: the TP size, "
                        "so every TP rank keeps the same count from its own shard, without communication)")


def config_from_args(args: argparse.Namespace) -> SATConfig:
    return SATConfig(
        enabled=args.sat, omission_rate_mlp=args.sat_omission_rate_mlp,
        omission_rate_heads=args.sat_omission_rate_heads, head_unit=args.sat_head_unit, lors_start=args.sat_lors_start,
        lors_end=args.sat_lors_end, lors_steps=args.sat_lors_steps, importance=args.sat_importance,
        selection=args.sat_selection, exempt_layers=args.sat_exempt_layers, freeze_omitted=args.sat_freeze_omitted,
        ema_decay=args.sat_ema_decay, balance_blocks=args.sat_balance_blocks,
    )
