"""Under torchrun (2 ranks, gloo): GradSync with `reduce_dtype=bfloat16`, all-reduce and reduce-scatter, on
gradients that differ per rank. Writes, per rank, the reduced FP32 gradient buffer (its owned range) and the
BF16 inputs, so the test can compute the exact expectation: the collective returns the correctly rounded BF16
sum of the two BF16 gradients (one addition), and the division by 2 in FP32 is exact."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megatron_eff.parallel.data_parallel import GradSync
from megatron_eff.parallel.state import initialize_parallel_state


def main(out: str) -> None:
    dist.init_process_group("gloo")
    pstate = initialize_parallel_state(1, 1)
    result = {}
    for shard in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(10))]
        sync = GradSync(params, pstate, bucket_size=1000, shard=shard, reduce_dtype=torch.bfloat16)
        sync.start(num_micro_batches=1)
        gen = torch.Generator().manual_seed(100 + pstate.dp_rank)
        grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
        sum((p * g).sum() for p, g in zip(params, grads, strict=True)).backward()
        sync.finish()
        result[shard] = {"buffer": sync.grad_buffer.clone(), "owned": [sync.owned_range(b) for b in sync.buckets],
                         "offsets": {i: sync.offsets[p] for i, p in enumerate(params)}, "grads": grads}
    torch.save(result, f"{out}.rank{pstate.dp_rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
