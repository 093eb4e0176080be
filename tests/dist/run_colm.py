"""`tests/dist/run_layout.py` for CoLM runs: also dumps every rank's coresets (dataset indices per iteration).

    torchrun --nproc_per_node 2 tests/dist/run_colm.py OUT.pt -- --colm ...
    python tests/dist/run_colm.py OUT.pt -- --colm ...       (single-process reference)

Writes `OUT.pt` (rank 0) = {"losses", "params" (full tensors), "selections": [per rank: [[dataset index, ...]
per iteration]]}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.parallel.state import shutdown_distributed  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402
from tests.dist.run_layout import full_tensor  # noqa: E402


def main() -> None:
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    torch.set_default_dtype(getattr(torch, os.environ.get("PARITY_DTYPE", "float64")))
    trainer = Trainer(config_from_args(parse_args(flags)))
    result = trainer.train()
    pstate = trainer.pstate
    selections = [trainer.methods.get("colm").selections]
    params = {name: full_tensor(p, pstate) for chunk in trainer.model for name, p in chunk.named_parameters()}
    if dist.is_initialized():
        selections = [None] * dist.get_world_size()
        dist.all_gather_object(selections, trainer.methods.get("colm").selections)
        if pstate.pp_size > 1:
            stages = [None] * pstate.pp_size
            dist.all_gather_object(stages, params, group=pstate.pp_group)
            params = {k: v for stage in stages for k, v in stage.items()}
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"losses": result.losses, "params": params, "selections": selections}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
