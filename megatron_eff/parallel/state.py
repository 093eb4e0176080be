"""Process groups for tensor, pipeline and data parallelism, held in one passed-around `ParallelState`.

Rank layout (Megatron's `tp-cp-ep-dp-pp` with cp = ep = 1): tensor-parallel rank varies fastest, then
data-parallel, then pipeline:

    global_rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so a TP group is always consecutive ranks (one node). `ParallelState.single()` is the no-parallelism state
used by single-process runs and tests; it needs no `torch.distributed` initialisation.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    tp_group: object | None = None
    pp_group: object | None = None
    dp_group: object | None = None
    model_parallel_group: object | None = None  # tp x pp: for the global grad norm across the model
    embedding_group: object | None = None  # first and last pipeline stage (tied embedding grads)
    pp_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of this rank's pipeline
    virtual_pp_size: int = 1

    @classmethod
    def single(cls) -> ParallelState:
        return cls()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
            f"pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}"
        )


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Global rank of a (tp, dp, pp) coordinate in the tp-fastest layout."""
    return pp_rank * (dp * tp) + dp_rank * tp + tp_rank


def coordinates_of(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def group_ranks(tp: int, dp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (pure function, unit-testable)."""
    tp_groups = [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_groups = [
        [rank_of(t, d, p, tp, dp) for p in range(pp) for t in range(tp)] for d in range(dp)
    ]
    emb_groups = [sorted({g[0], g[-1]}) for g in pp_groups]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "mp": mp_groups, "embedding": emb_groups}


DEVICE_ENV = "MEGATRON_EFF_DEVICE"  # cpu | cuda: overrides the automatic choice (the CPU test suite sets cpu)


def use_cuda() -> bool:
    """Run on CUDA (and NCCL) when a GPU is there, unless MEGATRON_EFF_DEVICE=cpu."""
    choice = os.environ.get(DEVICE_ENV, "").lower()
    if choice not in ("", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={choice!r}: expected cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device")
    return choice != "cpu" and torch.cuda.is_available()


DEFAULT_TIMEOUT_MINUTES = 10.0  # --distributed-timeout-minutes: a rank silent this long fails the others
_timeout = datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)  # the default group's, for the groups made later


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for another rank before it raises (`init_distributed`'s timeout)."""
    return _timeout


def init_distributed(backend: str | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise the default process group from torchrun's environment, if launched by torchrun. A collective
    that waits longer than `timeout_minutes` for another rank (stopped, deadlocked) raises instead of hanging
    for torch's default 30 minutes; every group created later inherits the timeout."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    if backend is None:
        backend = "nccl" if use_cuda() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    global _timeout
    _timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, timeout=_timeout)


def shutdown_distributed(clean: bool = True) -> None:
    """Destroy every process group (a no-op without one). Called at the end of a run, while the interpreter is
    fully alive: gloo's worker threads are joined here instead of during interpreter teardown, where a thread
    still releasing a finished collective's tensors could abort the process ("terminate called without an
    active exception"). After a failure (`clean=False`) the final barrier is skipped: another rank may be
    dead or stuck, and waiting for it would only add a timeout."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def communication_device() -> torch.device:
    """Where tensors made for a collective live: this rank's CUDA device under NCCL (which rejects CPU
    tensors; `init_distributed` set it from LOCAL_RANK), else the CPU (gloo, or no process group)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_parallel_state(tp: int = 1, pp: int = 1, num_layers_per_vpp_chunks: int = 1) -> ParallelState:
    """Create every TP/PP/DP group (collectively, in the same order on all ranks) for tensor-parallel size
    `tp` and pipeline-parallel size `pp` (DP takes the rest of the world) and return this rank's."""
    if not dist.is_initialized():
        if tp * pp != 1:
            raise ValueError(
                "--tensor-model-parallel-size/--pipeline-model-parallel-size > 1 need a torchrun launch "
                "(torch.distributed is not initialised)"
            )
        return ParallelState.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
                         f"--pipeline-model-parallel-size {pp}")
    dp = world // (tp * pp)
    tp_rank, dp_rank, pp_rank = coordinates_of(rank, tp, dp)
    state = ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        rank=rank, world_size=world, virtual_pp_size=num_layers_per_vpp_chunks,
    )
    groups = group_ranks(tp, dp, pp)
    for kind, attr in (("tp", "tp_group"), ("dp", "dp_group"), ("pp", "pp_group"),
                       ("mp", "model_parallel_group"), ("embedding", "embedding_group")):
        for ranks in groups[kind]:
            group = dist.new_group(ranks, timeout=_timeout)  # collective: every rank creates every group
            if rank in ranks:
                setattr(state, attr, group)
                if kind == "pp":
                    state.pp_ranks = ranks
    return state


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)
