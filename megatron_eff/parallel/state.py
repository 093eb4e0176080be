"""Process groups for tensor, context, pipeline and data parallelism, held in one passed-around `ParallelState`.

Rank layout (Megatron's `tp-cp-ep-dp-pp` with ep = 1): tensor-parallel rank varies fastest, then
context-parallel, then data-parallel, then pipeline:

    global_rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank

so a TP group is always consecutive ranks (one node), and a CP group's ranks are next to each other after it.
Context-parallel ranks hold the same weights and different pieces of each sequence
(`parallel/context_parallel.py`): gradients are reduced over the data-parallel x context-parallel group
(`dp_cp_group`, which is `dp_group` when cp = 1), while only the DP ranks read different samples.

`ParallelState.single()` is the no-parallelism state used by single-process runs and tests; it needs no
`torch.distributed` initialisation.
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
    cp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    cp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    tp_group: object | None = None
    pp_group: object | None = None
    dp_group: object | None = None
    cp_group: object | None = None
    cp_comm_type: str = "p2p"  # how attention reaches the other CP ranks' keys/values: p2p (ring) | allgather
    dp_cp_group: object | None = None  # dp x cp: gradient reduction and the distributed optimizer's shards
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

    @property
    def grad_group(self):
        """The ranks that hold the same weights and average their gradients: data x context parallel."""
        return self.dp_cp_group if self.cp_size > 1 else self.dp_group

    @property
    def grad_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def grad_rank(self) -> int:
        """This rank's index in `grad_group` (cp fastest, as the group's global ranks are ordered)."""
        return self.dp_rank * self.cp_size + self.cp_rank

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
            f"pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}"
            + (f" cp {self.cp_rank}/{self.cp_size}" if self.cp_size > 1 else "")
        )


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int, cp_rank: int = 0, cp: int = 1) -> int:
    """Global rank of a (tp, dp, pp[, cp]) coordinate in the tp-cp-dp-pp layout."""
    return pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank


def coordinates_of(rank: int, tp: int, dp: int, cp: int = 1) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank; `cp_coordinate_of` gives its CP rank."""
    return rank % tp, (rank // (tp * cp)) % dp, rank // (tp * cp * dp)


def cp_coordinate_of(rank: int, tp: int, cp: int) -> int:
    return (rank // tp) % cp


def group_ranks(tp: int, dp: int, pp: int, cp: int = 1) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (pure function, unit-testable)."""
    coords = [(t, c, d, p) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)]

    def groups(varying: str) -> list[list[int]]:
        """Ranks grouped by every coordinate not in `varying` (letters of "tcdp"), in rank order."""
        out: dict[tuple, list[int]] = {}
        for t, c, d, p in coords:
            key = tuple(v for name, v in zip("tcdp", (t, c, d, p)) if name not in varying)
            out.setdefault(key, []).append(rank_of(t, d, p, tp, dp, c, cp))
        return list(out.values())

    pp_groups = groups("p")
    return {"tp": groups("t"), "cp": groups("c"), "dp": groups("d"), "dp_cp": groups("cd"), "pp": pp_groups,
            "mp": groups("tp"), "embedding": [sorted({g[0], g[-1]}) for g in pp_groups]}


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


def initialize_parallel_state(tp: int = 1, pp: int = 1, num_layers_per_vpp_chunks: int = 1, cp: int = 1,
                              cp_comm_type: str = "p2p") -> ParallelState:
    """Create every TP/CP/PP/DP group (collectively, in the same order on all ranks) for tensor-parallel size
    `tp`, context-parallel size `cp` and pipeline-parallel size `pp` (DP takes the rest of the world) and
    return this rank's."""
    if not dist.is_initialized():
        if tp * pp * cp != 1:
            raise ValueError(
                "--tensor-model-parallel-size/--pipeline-model-parallel-size/--context-parallel-size > 1 need a "
                "torchrun launch (torch.distributed is not initialised)"
            )
        return ParallelState.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
                         f"--context-parallel-size {cp} x --pipeline-model-parallel-size {pp}")
    dp = world // (tp * pp * cp)
    tp_rank, dp_rank, pp_rank = coordinates_of(rank, tp, dp, cp)
    state = ParallelState(
        tp_size=tp, pp_size=pp, dp_size=dp, cp_size=cp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        cp_rank=cp_coordinate_of(rank, tp, cp), cp_comm_type=cp_comm_type, rank=rank, world_size=world,
        virtual_pp_size=num_layers_per_vpp_chunks,
    )
    groups = group_ranks(tp, dp, pp, cp)
    kinds = [("tp", "tp_group"), ("dp", "dp_group"), ("pp", "pp_group"), ("mp", "model_parallel_group"),
             ("embedding", "embedding_group")]
    if cp > 1:  # only then: a cp = 1 run creates exactly the groups it did before context parallelism existed
        kinds += [("cp", "cp_group"), ("dp_cp", "dp_cp_group")]
    for kind, attr in kinds:
        for ranks in groups[kind]:
            group = dist.new_group(ranks, timeout=_timeout)  # collective: every rank creates every group
            if rank in ranks:
                setattr(state, attr, group)
                if kind == "pp":
                    state.pp_ranks = ranks
    return state


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)
