"""Head/channel selection under TP = 2, with and without sequence parallel, against one process.

    torchrun --nproc_per_node 2 tests/dist/run_sites_tp.py

Each rank builds the same float64 model twice (TP = 2 and single-process; weights are layout-independent),
runs one layer with a selection given in *global* head-group / channel indices, converted to each rank's
local indices (one selection leaves rank 0 without heads), and checks the output and every parameter's
gradient against the single-process layer's (this rank's shard of it). Prints "ok" per rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.model.gpt_model import GPTModel  # noqa: E402
from megatron_eff.model.transformer import LayerSelection  # noqa: E402
from megatron_eff.parallel import mappings  # noqa: E402
from megatron_eff.parallel.layers import local_shard  # noqa: E402
from megatron_eff.parallel.state import ParallelState  # noqa: E402

CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
                     seq_length=16, vocab_size=300, position_embedding_type="rope", normalization="LayerNorm",
                     swiglu=True, add_bias_linear=True, untie_embeddings_and_output_weights=True)
SELECTIONS = [([0, 2, 3], [5, 50, 60, 90, 17]), ([2, 3], [1, 2])]  # global query groups, global ffn channels
EXACT = dict(rtol=1e-12, atol=1e-12)  # float64, summation order only (see tests/test_model_sites.py)


def local(indices: list[int], per_rank: int, rank: int) -> torch.Tensor:
    return torch.tensor([i - rank * per_rank for i in indices if i // per_rank == rank], dtype=torch.long)


def run_layer(layer, x, selection):
    x = x.clone().requires_grad_()
    y = layer(x, selection=selection)
    y.square().sum().backward()
    return y.detach()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp_group = dist.new_group([0, 1])
    pstate = ParallelState(tp_size=2, tp_rank=rank, rank=rank, world_size=2, tp_group=tp_group)
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sequence_parallel in (False, True):
        for groups, channels in SELECTIONS:
            ref = GPTModel(CONFIG, ParallelState.single(), seed=5).double().decoder.layers["1"]
            tp = GPTModel(CONFIG, pstate, sequence_parallel=sequence_parallel, seed=5).double().decoder.layers["1"]
            y_ref = run_layer(ref, x, LayerSelection(torch.tensor(groups), torch.tensor(channels)))
            selection = LayerSelection(local(groups, 2, rank), local(channels, 48, rank))
            x_in = x.chunk(2)[rank] if sequence_parallel else x
            y = run_layer(tp, x_in, selection)
            if sequence_parallel:
                y = mappings.gather_from_sequence_parallel_region(y, tp_group)
            torch.testing.assert_close(y, y_ref, **EXACT)
            ref_params = dict(ref.named_parameters())
            for name, param in tp.named_parameters():
                grad = param.grad
                if getattr(param, "sequence_parallel", False):  # partial over the sequence shards
                    dist.all_reduce(grad, group=tp_group)
                want = local_shard(ref_params[name].grad, getattr(param, "partition_dim", None), rank, 2)
                torch.testing.assert_close(grad, want, **EXACT, msg=f"{name} sp={sequence_parallel}")
    print("ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
