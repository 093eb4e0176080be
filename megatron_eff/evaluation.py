"""Loss and perplexity of a checkpoint over a token stream, under any TP/PP/DP layout (`tools/evaluate.py`).

The stream (the documents of one split of indexed datasets, in order, or a tokenized text file) is cut into
consecutive windows of `seq_length + 1` tokens that overlap by one, so every token after the first is
predicted exactly once with up to `seq_length` tokens of context. Windows are read in order in global
batches by pretraining's schedules (forward only); a last partial global batch is left out, and so is a
last window shorter than `seq_length + 1`. Every micro-batch holds the same number of tokens, so the mean
of the micro-batch losses is the token mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megatron_eff.config import Config
from megatron_eff.data.samplers import micro_batches
from megatron_eff.parallel.state import ParallelState
from megatron_eff.training.loss import iteration_loss
from megatron_eff.training.trainer import model_chunks, run_schedule


class TokenWindows:
    """Windows of `seq_length + 1` tokens over documents read one after the other (lazily)."""

    def __init__(self, lengths: np.ndarray, read, seq_length: int):
        """`read(document, offset, length)` returns that slice of a document's tokens."""
        self.read, self.seq_length = read, seq_length
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_length)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = i * self.seq_length, i * self.seq_length + self.seq_length + 1
        pieces = []
        doc = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            offset = start - int(self.starts[doc])
            length = min(end - start, int(self.starts[doc + 1]) - start)
            if length > 0:
                pieces.append(np.asarray(self.read(doc, offset, length), dtype=np.int64))
            start += length
            doc += 1
        return {"tokens": np.concatenate(pieces)}


def text_windows(token_ids: list[int], seq_length: int) -> TokenWindows:
    tokens = np.asarray(token_ids, dtype=np.int64)
    return TokenWindows(np.array([len(tokens)]), lambda doc, offset, length: tokens[offset:offset + length],
                        seq_length)


def indexed_windows(prefixes: list[str], split: str, split_name: str, seq_length: int) -> TokenWindows:
    """The documents of split `split_name` ('train' | 'valid' | 'test' | 'all') of each prefix, in order."""
    from megatron_eff.data.builders import SPLIT_NAMES, get_split_indices, parse_split
    from megatron_eff.data.indexed_dataset import IndexedDataset

    documents, lengths = [], []  # (dataset, document index), tokens per document
    for prefix in prefixes:
        indexed = IndexedDataset(prefix)
        if split_name == "all":
            first, last = 0, indexed.num_documents
        else:
            bounds = get_split_indices(parse_split(split), indexed.num_documents)
            k = SPLIT_NAMES.index(split_name)
            first, last = bounds[k], bounds[k + 1]
        documents += [(indexed, d) for d in range(first, last)]
        lengths.append(indexed.document_lengths[first:last])

    def read(doc: int, offset: int, length: int) -> np.ndarray:
        ds, d = documents[doc]
        return ds.get_document(d, offset, length)

    return TokenWindows(np.concatenate(lengths), read, seq_length)


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int  # predicted tokens the loss averages over
    windows: int


def count_batches(windows: TokenWindows, config: Config, dp_size: int, max_batches: int | None = None) -> int:
    """Full global batches to evaluate; an error when there is not even one."""
    gbs = config.train.resolved_global_batch_size(dp_size)
    config.train.num_micro_batches(dp_size)  # checks divisibility
    num_batches = len(windows) // gbs if max_batches is None else min(max_batches, len(windows) // gbs)
    if num_batches <= 0:
        raise ValueError(
            f"{windows.num_tokens} tokens make {len(windows)} windows of --seq-length {config.model.seq_length} "
            f"+ 1, fewer than one global batch ({gbs}); use more text or lower --global-batch-size"
        )
    return num_batches


@torch.no_grad()
def evaluate_windows(model, windows: TokenWindows, config: Config, pstate: ParallelState, autocast,
                     max_batches: int | None = None) -> EvalResult:
    """Mean loss over the first `max_batches` (default: all) full global batches of `windows`. Collective."""
    m = config.train.num_micro_batches(pstate.dp_size)
    num_batches = count_batches(windows, config, pstate.dp_size, max_batches)
    gbs = config.train.resolved_global_batch_size(pstate.dp_size)
    for chunk in model_chunks(model):
        chunk.eval()
    batches = micro_batches(windows, 0, config.train.micro_batch_size, pstate.dp_rank, pstate.dp_size)
    losses = []
    for _ in range(num_batches):
        losses += run_schedule(model, batches, m, config, pstate, autocast, forward_only=True)
    loss = iteration_loss(losses, pstate)[0]
    return EvalResult(loss, math.exp(min(loss, 100.0)), num_batches * gbs * config.model.seq_length,
                      num_batches * gbs)
