"""Run a few training iterations under any layout and dump what parity tests compare.

    torchrun --nproc_per_node 4 tests/dist/run_layout.py OUT.pt -- --tensor-model-parallel-size 2 ...
    python tests/dist/run_layout.py OUT.pt -- ...        (single-process reference)

The model is built in float64 unless PARITY_DTYPE=float32 (see `tests/dist_utils.py` for why).

Writes `OUT.pt` (from global rank 0) = {"losses": [...], "params": {global_name: full fp32 tensor},
"optimizer_numel": [per rank]}: the per-iteration losses, every parameter reassembled across TP shards and
PP stages, and how many optimizer-state elements each rank holds; plus "tied_copies" = {"output_layer.weight":
full tensor} when a last pipeline stage holds a copy of the tied embedding, and "masks" = {module name: full
boolean `weight_mask`} when a method (MST) installed masks, and "param_gather_bytes" = {dtype: bytes} that
rank 0's last parameter all-gather of the distributed optimizer moved. With `DUMMY_METHOD=1` the contract-test method
(`tests/dist/dummy_method.py`) is registered (`--dummy` turns it on) and "method" = {"events": its event
counts, "ema": {global layer index: value}} is added. "dynamo_graphs": the graphs torch.compile captured on
rank 0 (`--torch-compile`; 0 without). With `--sat`, "sat" = one entry per rank: {"tp", "dp",
"pp": its coordinates, "selections": [per iteration: {global layer: (kept query groups, kept channels)}]}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch._dynamo
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eff import methods  # noqa: E402
from megatron_eff.arguments import config_from_args, parse_args  # noqa: E402
from megatron_eff.parallel.state import shutdown_distributed  # noqa: E402
from megatron_eff.training.trainer import Trainer  # noqa: E402


def full_tensor(param: torch.Tensor, pstate) -> torch.Tensor:
    """All-gather a TP shard along its partition dim (replicated params are returned as they are)."""
    dim = getattr(param, "partition_dim", None)
    if dim is None or pstate.tp_size == 1:
        return param.detach().clone()
    parts = [torch.empty_like(param) for _ in range(pstate.tp_size)]
    dist.all_gather(parts, param.detach().contiguous(), group=pstate.tp_group)
    return torch.cat(parts, dim=dim)


def full_masks(model, pstate) -> dict[str, torch.Tensor]:
    """Every `weight_mask` buffer a method installed (MST), reassembled like its module's weight."""
    masks = {}
    for name, module in model.named_modules():
        mask = getattr(module, "weight_mask", None)
        if mask is not None:
            as_param = mask.to(torch.uint8)
            as_param.partition_dim = getattr(module.weight, "partition_dim", None)
            masks[name] = full_tensor(as_param, pstate).bool()
    return masks


def optimizer_state_numel(optimizer) -> int:
    """Elements of AdamW moments this rank holds (the distributed optimizer holds ~1/dp of them)."""
    return sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")


def main() -> None:
    out, flags = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    torch.set_default_dtype(getattr(torch, os.environ.get("PARITY_DTYPE", "float64")))
    if os.environ.get("DUMMY_METHOD") == "1":
        methods.REGISTRY["dummy"] = "tests.dist.dummy_method"
    trainer = Trainer(config_from_args(parse_args(flags)))
    sat = trainer.methods.get("sat")
    selections = []
    if sat is not None:  # record each iteration's selection (global indices of this rank's shard)
        select = sat.before_iteration
        sat.before_iteration = lambda it: (select(it), selections.append(sat.global_selections()))
    result = trainer.train()
    pstate, models = trainer.pstate, trainer.model
    dummy = trainer.methods.get("dummy")
    method = None
    if dummy is not None:
        method = {"events": dict(dummy.events),
                  "ema": {i: layer.dummy_ema.item() for i, layer in zip(dummy.indices, dummy.layers)}}
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, method)
            method = {"events": [g["events"] for g in gathered],
                      "ema": {i: v for g in gathered for i, v in g["ema"].items()}}
    params, tied_copies, masks = {}, {}, {}
    for model in models:
        masks.update(full_masks(model, pstate))
        for name, p in model.named_parameters():
            if getattr(p, "shared_embedding", False) and name == "output_layer.weight":
                tied_copies[name] = full_tensor(p, pstate)  # the last stage's copy of the tied embedding
                continue
            params[name] = full_tensor(p, pstate)
    if dist.is_initialized() and pstate.pp_size > 1:
        gathered = [None] * pstate.pp_size
        dist.all_gather_object(gathered, (params, tied_copies, masks), group=pstate.pp_group)
        params = {k: v for stage, _, _ in gathered for k, v in stage.items()}
        tied_copies = {k: v for _, copies, _ in gathered for k, v in copies.items()}
        masks = {k: v for _, _, stage_masks in gathered for k, v in stage_masks.items()}
    optimizer_numel = [optimizer_state_numel(trainer.optimizer)]
    if dist.is_initialized():
        optimizer_numel = [None] * dist.get_world_size()
        dist.all_gather_object(optimizer_numel, optimizer_state_numel(trainer.optimizer))
    sat_runs = None
    if sat is not None:
        sat_runs = [{"tp": pstate.tp_rank, "dp": pstate.dp_rank, "pp": pstate.pp_rank, "selections": selections}]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sat_runs[0])
            sat_runs = gathered
    if not dist.is_initialized() or dist.get_rank() == 0:
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        torch.save({"dynamo_graphs": graphs, "sat": sat_runs, "losses": result.losses, "params": params,
                    "optimizer_numel": optimizer_numel, "tied_copies": tied_copies, "masks": masks, "method": method,
                    "param_gather_bytes": trainer.grad_sync.param_gather_bytes}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
