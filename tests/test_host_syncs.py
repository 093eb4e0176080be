"""The training loop reads the device on the host once per iteration (the skip decision), not once per
micro-batch nor once per value: losses, token counts, the gradient norm and the ranks' exit agreement are
read together.

A CPU has no device to wait for, so the reads are counted where they happen: every op that turns a tensor
into a host value (`.item()`, `bool()`, `float()`, data-dependent shapes such as `nonzero`) passes through
`aten._local_scalar_dense` or a shape op the dispatch mode sees, and `.tolist()` (which reads memory without
an op) is counted by wrapping it. Two runs that differ by three iterations differ by three reads exactly."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.training import trainer as trainer_lib

TINY = ["--model-preset", "llama-tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "6",
        "--seq-length", "16", "--max-position-embeddings", "16", "--hidden-size", "32", "--num-attention-heads", "2",
        "--num-query-groups", "2", "--group-query-attention", "--ffn-hidden-size", "64", "--log-interval", "1000",
        "--clip-grad", "1.0"]
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
               "repeat_interleave"}


class _CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _reads_of_run(monkeypatch, iterations: int, *flags: str) -> list[str]:
    trainer = trainer_lib.Trainer(config_from_args(parse_args([*TINY, "--train-iters", str(iterations), *flags])))
    counter = _CountReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        counter.reads.append("tolist")
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with counter:
        trainer.train()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return counter.reads


def test_one_host_read_per_iteration_with_three_micro_batches(monkeypatch):
    short, long = _reads_of_run(monkeypatch, 2), _reads_of_run(monkeypatch, 5)
    assert Counter(long) - Counter(short) == Counter({"tolist": 3}), (short, long)


def test_per_token_loss_keeps_the_token_count_on_the_device(monkeypatch):
    short = _reads_of_run(monkeypatch, 2, "--calculate-per-token-loss")
    long = _reads_of_run(monkeypatch, 5, "--calculate-per-token-loss")
    assert Counter(long) - Counter(short) == Counter({"tolist": 3}), (short, long)
