"""Context-parallel attention against the single-process layer, in one torchrun launch (float64).

    torchrun --nproc_per_node 2 tests/dist/run_cp_attention.py OUT.pt {p2p,allgather} [matmul]

Every rank builds the same `SelfAttention` (RoPE, GQA) twice from one seed: once without parallelism (the
reference, run on the whole sequence) and once with CP = world size (run on this rank's load-balanced
positions, with the CP attention of the second argument; `matmul`: the ring's blocks without PyTorch's CPU
flash kernels). Writes `OUT.pt` from rank 0 = {"out_diff",
"input_grad_diff", "weight_grad_diff", "positions"}: the largest absolute differences of the layer output and
input gradient at this rank's positions (max over ranks) and of the weight gradients summed over the CP group, which must equal the reference's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.model.attention import SelfAttention  # noqa: E402
from megatron_eff.model.local_backend import LocalBackend  # noqa: E402
from megatron_eff.parallel import ring_attention  # noqa: E402
from megatron_eff.parallel.layers import init_parallel_parameters  # noqa: E402
from megatron_eff.parallel.state import ParallelState, initialize_parallel_state  # noqa: E402


def build(config: ModelConfig, pstate: ParallelState) -> SelfAttention:
    layer = SelfAttention(config, LocalBackend(config, pstate, sequence_parallel=False), layer_number=0)
    init_parallel_parameters(layer.named_parameters(), seed=0)  # the same weights in both
    return layer


def main() -> None:
    torch.set_default_dtype(torch.float64)
    ring_attention.USE_CPU_FLASH_KERNELS = sys.argv[3:] != ["matmul"]
    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    pstate = initialize_parallel_state(cp=cp, cp_comm_type=sys.argv[2])
    config = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         seq_length=8 * cp, max_position_embeddings=8 * cp, position_embedding_type="rope",
                         normalization="RMSNorm", swiglu=True, add_bias_linear=False, vocab_size=64)
    s, b = config.seq_length, 2
    torch.manual_seed(1)
    x = torch.randn(s, b, config.hidden_size)  # the same full sequence on every rank
    grad_out = torch.randn(s, b, config.hidden_size)

    reference = build(config, ParallelState.single())
    x_ref = x.clone().requires_grad_(True)
    out_ref = reference(x_ref)
    out_ref.backward(grad_out)

    layer = build(config, pstate)
    positions = layer.context_parallel.positions(s // cp)
    x_local = x[positions].clone().requires_grad_(True)  # [s/cp, b, h] at this rank's positions
    out = layer(x_local)
    out.backward(grad_out[positions])

    assert torch.isfinite(out_ref).all() and out_ref.abs().max() > 0
    diffs = torch.tensor([
        (out - out_ref[positions]).abs().max().item(),
        (x_local.grad - x_ref.grad[positions]).abs().max().item(),
    ])
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    weight_diff = 0.0
    for p, p_ref in zip(layer.parameters(), reference.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)  # each rank's queries give part of the weight gradient: they add up
        weight_diff = max(weight_diff, (grad - p_ref.grad).abs().max().item())
    gathered = [None] * cp
    dist.all_gather_object(gathered, positions.tolist())
    if dist.get_rank() == 0:
        torch.save({"out_diff": diffs[0].item(), "input_grad_diff": diffs[1].item(),
                    "weight_grad_diff": weight_diff, "positions": gathered}, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
