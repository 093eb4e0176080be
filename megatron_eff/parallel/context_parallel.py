"""Context parallelism (`--context-parallel-size`): each sequence is split over the CP ranks, and attention
sees the whole sequence by gathering keys and values inside the CP group.

Load balancing (Megatron-LM's): the sequence of length s is cut into 2·cp chunks of s/(2 cp) tokens and
CP rank r holds chunks r and 2·cp−1−r, so under the causal mask every rank has the same amount of attention
work (an early chunk attends to little, its partner late chunk to much):

    cp = 2, s = 8:  chunks [0 1][2 3][4 5][6 7]  ->  rank 0: positions 0 1 6 7,  rank 1: positions 2 3 4 5

`ContextParallel.split_batch` takes this rank's positions out of every `[b, s]` tensor of a micro-batch
(tokens, labels, loss mask); the model then runs on `[s/cp, b, h]` activations and places its position
embeddings (learned or RoPE) at the global positions `ContextParallel.positions` gives.

Attention (`ContextParallel.attention`), under the causal mask of *global* positions (`q_pos >= k_pos`), in
one of two ways (`--cp-comm-type`, Megatron-LM's names), both plain `torch.distributed` (gloo/CPU and NCCL):

- `p2p` (default, as Megatron-LM): ring attention, `parallel/ring_attention.py`. K/V blocks travel around
  the CP group by send/recv while each rank attends to the block it holds (online softmax); one block at a
  time besides its own. No attention dropout.
- `allgather`: the keys and values of all CP ranks are all-gathered (one collective for both; the backward
  reduce-scatters their gradients, so each rank's K/V receive the gradient of every rank's queries), and
  SDPA runs with the mask. Keys need not be put back in sequence order: softmax does not care about the
  order of the keys, only the mask does (the scheme of the Llama 3 paper). Holds full-length K/V.

Loss: each CP rank sums the token losses of its positions. The loss function returns `cp x local sum` with
the micro-batch's token count over the whole CP group, so the data x context-parallel gradient average
(`ParallelState.grad_group`) gives exactly the gradient of the global token mean, loss masks included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_eff.parallel import mappings
from megatron_eff.parallel.ring_attention import ring_attention
from megatron_eff.parallel.state import ParallelState


def check_seq_length(seq_length: int, cp_size: int) -> None:
    """Load-balanced chunking needs 2·cp equal chunks of the sequence."""
    if cp_size > 1 and seq_length % (2 * cp_size):
        raise ValueError(f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size "
                         f"({2 * cp_size}) for context parallelism's load-balanced chunks")


def load_balanced_positions(seq_length: int, cp_rank: int, cp_size: int,
                            device: torch.device | None = None) -> torch.Tensor:
    """Global positions (int64 `[s/cp]`) held by `cp_rank`: chunks r and 2·cp−1−r of 2·cp."""
    check_seq_length(seq_length, cp_size)
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat((first, second))


@dataclass
class ContextParallel:
    """One rank's view of its CP group; `from_state` gives None without context parallelism."""

    group: object
    rank: int
    size: int
    comm_type: str = "p2p"  # p2p (ring attention) | allgather

    @classmethod
    def from_state(cls, pstate: ParallelState) -> ContextParallel | None:
        if pstate.cp_size == 1:
            return None
        return cls(pstate.cp_group, pstate.cp_rank, pstate.cp_size, pstate.cp_comm_type)

    def positions(self, local_length: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions `[s/cp]` of this rank's `local_length` = s/cp tokens."""
        return load_balanced_positions(local_length * self.size, self.rank, self.size, device)

    def all_positions(self, local_length: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions `[s]` of the CP group's tokens in rank order (the order of an all-gather)."""
        s = local_length * self.size
        return torch.cat([load_balanced_positions(s, r, self.size, device) for r in range(self.size)])

    def split_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's positions of every `[b, s, ...]` tensor of a micro-batch (those whose second dimension is
        the tokens' sequence length); per-sample entries (`dataset_id`) pass unchanged."""
        tokens = batch["tokens"] if "tokens" in batch else batch["labels"]
        s = tokens.shape[1]
        index = load_balanced_positions(s, self.rank, self.size, tokens.device)
        return {key: value.index_select(1, index) if value.dim() >= 2 and value.shape[1] == s else value
                for key, value in batch.items()}

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                  gqa: bool = False) -> torch.Tensor:
        """Causal attention of the local queries over the CP group's keys: q `[s/cp, b, nq, d]`, k/v
        `[s/cp, b, g, d]` -> `[s/cp, b, nq * d]`."""
        local = q.shape[0]
        if self.comm_type == "p2p":
            block_positions = self.all_positions(local, q.device).view(self.size, local)
            out = ring_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                 self.positions(local, q.device), block_positions, self.group)  # [b, nq, s/cp, d]
            return out.permute(2, 0, 1, 3).reshape(local, q.shape[1], -1)
        kv = mappings.gather_from_sequence_parallel_region(torch.stack((k, v)).transpose(0, 1), self.group)
        k_all, v_all = kv.unbind(1)  # [s, b, g, d] each, in rank order
        q_pos = self.positions(local, q.device)
        k_pos = self.all_positions(local, q.device)
        mask = q_pos[:, None] >= k_pos[None, :]  # [s/cp, s]: True where a query may attend
        out = F.scaled_dot_product_attention(
            q.permute(1, 2, 0, 3), k_all.permute(1, 2, 0, 3), v_all.permute(1, 2, 0, 3), attn_mask=mask,
            dropout_p=dropout_p, enable_gqa=gqa,
        )  # [b, nq, s/cp, d]
        return out.permute(2, 0, 1, 3).reshape(local, q.shape[1], -1)

    def loss(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cp x this rank's loss sum, the micro-batch's token count over the CP group): see the module
        docstring for why the grad-group average of the backward of `loss_sum / num_tokens` is then exact."""
        total = num_tokens.detach().clone()
        dist.all_reduce(total, group=self.group)
        return loss_sum * self.size, total
