"""MST's configuration and command-line flags (`--mst-*`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_eff.config import require

RESTORE_SCHEDULES = ("mirror", "staircase", "linear", "cubic")


@dataclass
class MSTConfig:
    """Mixed Sparsity Training (`--mst-*`, README.md, "MST — Mixed Sparsity Training"). Phases are given as iterations
    (`phase_iters`) or as fractions of `--train-iters` (`phase_fractions`); `schedule.MSTSchedule` resolves
    them against the run length."""

    enabled: bool = False
    phase_iters: tuple[int, int, int] | None = None  # warm-up, ultra-sparse, restoration
    phase_fractions: tuple[float, float, float] = (0.2, 0.4, 0.2)  # the rest of the run (0.2) trains dense
    max_sparsity: float = 0.9
    schedule: str = "staircase"  # staircase | linear | cubic: the warm-up ramp
    restore_schedule: str = "cubic"  # mirror | staircase | linear | cubic: the restoration ramp
    schedule_steps: int = 4  # staircase: at least this many stairs per ramp (caps the stair length)
    stair_iters: int = 1000  # staircase: iterations per stair (capped to ramp / schedule_steps)
    update_interval: int = 100
    drop_fraction: float = 0.3
    grow_grad_random_ratio: float = 3.0
    distribution: str = "er"  # er | uniform
    sparsify_head: bool = False
    reset_optimizer_state: bool = True
    hsa_pattern: str = "sparse"  # none | local | strided | sparse | fixed
    hsa_window: int | None = None  # default: seq_length // 8 (128 at 1024)
    hsa_iters: tuple[int, int] | None = None  # [start, end) iterations; default: the ultra-sparse phase
    hsa_layers: tuple[int, ...] | None = None  # global layer indices; default: all
    hsa_impl: str = "factorized"  # factorized (only the pattern's scores) | mask (SDPA + boolean mask)
    decay_embeddings: bool = True  # False: no weight decay on the word/position embeddings (tied head included)

    def __post_init__(self) -> None:
        if self.phase_iters is not None:
            require(
                len(self.phase_iters) == 3 and all(n >= 0 for n in self.phase_iters),
                f"--mst-phase-iters needs three non-negative iteration counts WARM,ULTRA,RESTORE, got "
                f"{self.phase_iters}",
            )
        require(
            len(self.phase_fractions) == 3 and all(f >= 0 for f in self.phase_fractions)
            and sum(self.phase_fractions) <= 1 + 1e-9,
            f"--mst-phase-fractions needs three fractions >= 0 summing to <= 1, got {self.phase_fractions}",
        )
        require(0 <= self.max_sparsity < 1, f"--mst-max-sparsity must be in [0, 1), got {self.max_sparsity}")
        require(
            self.schedule in ("staircase", "linear", "cubic"),
            f"--mst-schedule must be staircase, linear or cubic, got {self.schedule!r}",
        )
        require(
            self.restore_schedule in RESTORE_SCHEDULES,
            f"--mst-restore-schedule must be {', '.join(RESTORE_SCHEDULES)}, got {self.restore_schedule!r}",
        )
        require(self.schedule_steps >= 1, f"--mst-schedule-steps must be >= 1, got {self.schedule_steps}")
        require(self.stair_iters >= 1, f"--mst-stair-iters must be >= 1, got {self.stair_iters}")
        require(self.update_interval >= 1, f"--mst-update-interval must be >= 1, got {self.update_interval}")
        require(0 <= self.drop_fraction < 1, f"--mst-drop-fraction must be in [0, 1), got {self.drop_fraction}")
        require(
            self.grow_grad_random_ratio >= 0,
            f"--mst-grow-grad-random-ratio must be >= 0, got {self.grow_grad_random_ratio}",
        )
        require(
            self.distribution in ("er", "uniform"),
            f"--mst-distribution must be er or uniform, got {self.distribution!r}",
        )
        require(
            self.hsa_pattern in ("none", "local", "strided", "sparse", "fixed"),
            f"--mst-hsa-pattern must be none, local, strided, sparse or fixed, got {self.hsa_pattern!r}",
        )
        require(
            self.hsa_impl in ("factorized", "mask"), f"--mst-hsa-impl must be factorized or mask, got {self.hsa_impl!r}"
        )
        if self.hsa_window is not None:
            require(self.hsa_window >= 1, f"--mst-hsa-window must be >= 1, got {self.hsa_window}")
        if self.hsa_iters is not None:
            require(
                len(self.hsa_iters) == 2 and 0 <= self.hsa_iters[0] <= self.hsa_iters[1],
                f"--mst-hsa-iters needs START,END with 0 <= START <= END, got {self.hsa_iters}",
            )

    def check_run(self, config) -> None:
        """Rules that need the model shape and the run length (`config`: the run's `Config`)."""
        model, train = config.model, config.train
        require(not config.precision.fp8_param_gather,
                "--mst cannot be combined with --fp8-param-gather (MST masks and rewrites the weights after the "
                "step and reads the full FP32 weights; the FP8 weight copy would be cast before that)")
        require(self.hsa_pattern == "none" or config.parallel.context_parallel_size == 1,
                f"--mst-hsa-pattern {self.hsa_pattern}: hybrid sparse attention is not built for "
                "--context-parallel-size > 1 (use --mst-hsa-pattern none, or CP 1)")
        if self.phase_iters is not None:
            require(
                sum(self.phase_iters) <= train.train_iters,
                f"--mst-phase-iters {','.join(map(str, self.phase_iters))} sums to more than --train-iters "
                f"{train.train_iters}",
            )
        window = self.hsa_window or max(1, model.seq_length // 8)
        if self.hsa_pattern == "fixed":
            require(
                model.seq_length % window == 0,
                f"--mst-hsa-pattern fixed needs --seq-length {model.seq_length} divisible by --mst-hsa-window "
                f"{window}",
            )
        for layer in self.hsa_layers or ():
            require(
                0 <= layer < model.num_layers,
                f"--mst-hsa-layers: layer {layer} is not in [0, --num-layers {model.num_layers})",
            )


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("MST: mixed sparsity training (README.md, section MST)")
    g.add_argument("--mst", action="store_true", help="train with MST: warm-up, ultra-sparse, restoration phases")
    g.add_argument("--mst-phase-iters", type=_int_list, metavar="WARM,ULTRA,RESTORE",
                   help="phase lengths in iterations (default: --mst-phase-fractions of --train-iters)")
    g.add_argument("--mst-phase-fractions", type=_float_list, default=(0.2, 0.4, 0.2),
                   metavar="WARM,ULTRA,RESTORE",
                   help="phase lengths as fractions of --train-iters; what they leave (default 0.2) trains dense")
    g.add_argument("--mst-max-sparsity", type=float, default=0.9, help="sparsity of the ultra-sparse phase")
    g.add_argument("--mst-schedule", choices=["staircase", "linear", "cubic"], default="staircase",
                   help="shape of the warm-up ramp (dense -> --mst-max-sparsity)")
    g.add_argument("--mst-restore-schedule", choices=RESTORE_SCHEDULES, default="cubic",
                   help="shape of the restoration ramp (-> dense): cubic s_max (1-x)^3 is mostly dense early; "
                        "mirror: the warm-up ramp reversed in time")
    g.add_argument("--mst-stair-iters", type=int, default=1000,
                   help="staircase: iterations per stair, capped so a ramp has at least --mst-schedule-steps")
    g.add_argument("--mst-schedule-steps", type=int, default=4,
                   help="staircase: the fewest stairs per ramp (short runs: ramp / this iterations per stair)")
    g.add_argument("--mst-update-interval", type=int, default=100,
                   help="iterations between drop/grow updates (capped to a quarter of the shortest phase); stair "
                        "starts and the ends of warm-up and restoration only resize")
    g.add_argument("--mst-drop-fraction", type=float, default=0.3,
                   help="zeta: fraction of active weights dropped, cosine-decayed over the run")
    g.add_argument("--mst-grow-grad-random-ratio", type=float, default=3.0,
                   help="r: r/(r+1) of the grown weights by gradient, the rest at random")
    g.add_argument("--mst-distribution", choices=["er", "uniform"], default="er",
                   help="per-layer density: Erdos-Renyi or the same for every layer")
    g.add_argument("--mst-sparsify-head", action="store_true", help="also sparsify the output layer (tied: embedding)")
    g.add_argument("--mst-reset-optimizer-state", action=argparse.BooleanOptionalAction, default=True,
                   help="zero the AdamW moments of inactive and newly grown weights")
    g.add_argument("--mst-hsa-pattern", choices=["none", "local", "strided", "sparse", "fixed"], default="sparse",
                   help="hybrid sparse attention pattern inside its window (none: always dense causal)")
    g.add_argument("--mst-hsa-window", type=int, help="pattern width/stride w (default: --seq-length / 8)")
    g.add_argument("--mst-hsa-iters", type=_int_list, metavar="START,END",
                   help="iterations [START, END) with sparse attention (default: the ultra-sparse phase)")
    g.add_argument("--mst-hsa-layers", type=_int_list, metavar="I,J,...",
                   help="global layer indices that use sparse attention (default: all)")
    g.add_argument("--mst-hsa-impl", choices=["factorized", "mask"], default="factorized",
                   help="factorized: compute only the pattern's scores; mask: SDPA with a boolean mask (reference)")
    g.add_argument("--mst-decay-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="weight decay on the word/position embeddings (--no-mst-decay-embeddings: decay the "
                        "linears only, as the authors' GPT-2 code)")


def config_from_args(args: argparse.Namespace) -> MSTConfig:
    return MSTConfig(
        enabled=args.mst, phase_iters=args.mst_phase_iters, phase_fractions=args.mst_phase_fractions,
        max_sparsity=args.mst_max_sparsity, schedule=args.mst_schedule, restore_schedule=args.mst_restore_schedule,
        schedule_steps=args.mst_schedule_steps, stair_iters=args.mst_stair_iters,
        update_interval=args.mst_update_interval, drop_fraction=args.mst_drop_fraction,
        grow_grad_random_ratio=args.mst_grow_grad_random_ratio, distribution=args.mst_distribution,
        sparsify_head=args.mst_sparsify_head, reset_optimizer_state=args.mst_reset_optimizer_state,
        hsa_pattern=args.mst_hsa_pattern, hsa_window=args.mst_hsa_window, hsa_iters=args.mst_hsa_iters,
        hsa_layers=args.mst_hsa_layers, hsa_impl=args.mst_hsa_impl,
        decay_embeddings=args.mst_decay_embeddings,
    )
