"""Deterministic batches for data-parallel training, resumable from a consumed-sample count.

Like Megatron's `MegatronPretrainingSampler`: the dataset is read in order (its own shuffle index does the
shuffling); each step of `micro_batch_size * dp` samples is cut into one contiguous slice per DP rank.
A global batch is `num_micro_batches` such steps, so `consumed_samples` after an iteration is exact and a
restarted run continues at the very next sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from megatron_eff.data.builders import collate_samples


def micro_batch_indices(consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """Dataset indices of this rank's micro-batch that starts at `consumed_samples` (global count)."""
    start = consumed_samples + dp_rank * micro_batch_size
    return range(start, start + micro_batch_size)


class MicroBatchSampler:
    """This rank's micro-batches as lists of dataset indices, from `consumed_samples` (global count) until the
    dataset ends; also a `DataLoader` batch sampler."""

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1):
        self.num_samples, self.consumed_samples = num_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.step = micro_batch_size * dp_size  # samples of all DP ranks per micro-batch step

    def __iter__(self) -> Iterator[list[int]]:
        for position in range(self.consumed_samples, self.num_samples - self.step + 1, self.step):
            yield list(micro_batch_indices(position, self.micro_batch_size, self.dp_rank, self.dp_size))

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.consumed_samples) // self.step)


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0,
                  dp_size: int = 1, num_workers: int = 0) -> Iterator[dict]:
    """Endless (until the dataset ends) iterator over this rank's micro-batches. With `num_workers` > 0
    (`--num-workers`) a torch `DataLoader` reads and collates them in worker processes ahead of use, in the
    same order (samples are deterministic per index, so the batches are bit-identical)."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    if num_workers == 0:
        return (collate_samples([dataset[i] for i in indices]) for indices in sampler)
    from torch.utils.data import DataLoader

    return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples, num_workers=num_workers))


class MockGPTDataset:
    """Synthetic tokens, deterministic per index (for benchmarks and layout-parity tests without data): ids
    uniform over the model's vocabulary before padding, the tokenizer's (NullTokenizer's eod included)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        return {"tokens": rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)}
