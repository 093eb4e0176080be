"""A whole GPT model's loss and gradients under context parallelism against one process (float64).

    torchrun --nproc_per_node 2 tests/dist/run_cp_model.py OUT.pt {p2p,allgather} {rope,learned_absolute}

Every rank builds the model twice from one seed, without parallelism and with CP = world size, and runs one
micro-batch through the loss contract (`lm_forward_step`, then backward of `loss_sum / num_tokens` as the
schedules do) with a loss mask that drops a third of the tokens unevenly between the CP ranks' positions.
The CP gradients are averaged over the CP group (what the data x context-parallel reduction does), the CP
losses averaged likewise (what `iteration_loss` does). Writes from rank 0 {"loss", "reference_loss",
"grad_diff", "grad_scale"}: the largest absolute gradient difference over all parameters and the largest
reference gradient, so a gradient off by a factor (which Adam and clipping would hide in training) shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.model.gpt_model import GPTModel  # noqa: E402
from megatron_eff.model.loss import lm_forward_step  # noqa: E402
from megatron_eff.parallel.state import ParallelState, initialize_parallel_state  # noqa: E402


def loss_and_grads(model: GPTModel, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    out, loss_func = lm_forward_step(model, batch, None)
    loss_sum, num_tokens, _ = loss_func(out)
    loss = loss_sum / num_tokens
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def main() -> None:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    comm_type, positions = sys.argv[2], sys.argv[3]
    pstate = initialize_parallel_state(cp=cp, cp_comm_type=comm_type)
    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         seq_length=8 * cp, max_position_embeddings=8 * cp, position_embedding_type=positions,
                         vocab_size=64)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length + 1), generator=generator)
    loss_mask = (torch.rand(2, config.seq_length, generator=generator) > 0.33).double()
    loss_mask[0, : config.seq_length // 2] = 0.0  # rank 0's early chunk loses more tokens than the others
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask}

    reference_loss, reference = loss_and_grads(GPTModel(config, ParallelState.single(), seed=0), batch)
    loss, grads = loss_and_grads(GPTModel(config, pstate, seed=0), batch)
    summed = torch.tensor([loss])
    dist.all_reduce(summed)
    grad_diff = 0.0
    for name, grad in grads.items():
        dist.all_reduce(grad)
        grad_diff = max(grad_diff, (grad / cp - reference[name]).abs().max().item())
    if dist.get_rank() == 0:
        torch.save({"loss": summed.item() / cp, "reference_loss": reference_loss, "grad_diff": grad_diff,
                    "grad_scale": max(g.abs().max().item() for g in reference.values())}, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
