"""Key/value cache for incremental decoding (generation), threaded through `GPTModel.forward` as
`inference_cache=`. Training never passes one, so its forward is unchanged.

The cache holds, per attention layer, preallocated `[b, g, max_length, d]` keys and values and the number
of positions already filled (`offset`): a forward over `s` new tokens rotates / position-embeds them at
`offset .. offset+s-1`, attends to every cached position plus its causal prefix, and `GPTModel.forward`
advances `offset` by `s` at the end.
"""

from __future__ import annotations

import torch


class InferenceCache:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.offset = 0
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: object, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new `k, v [b, g, s, d]`; returns all keys/values so far `[b, g, offset+s, d]`."""
        end = self.offset + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"inference cache holds {self.max_length} positions, asked for {end}")
        if id(layer) not in self._kv:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self._kv[id(layer)] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self._kv[id(layer)]
        keys[:, :, self.offset:end] = k
        values[:, :, self.offset:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def causal_mask(self, s: int, device) -> torch.Tensor | None:
        """Boolean `[s, offset+s]` mask for `s` new queries (None for one query: it sees everything)."""
        if s == 1:
            return None
        return torch.ones(s, self.offset + s, dtype=torch.bool, device=device).tril(diagonal=self.offset)

    def advance(self, s: int) -> None:
        self.offset += s

    def reset(self) -> None:
        self.offset = 0
