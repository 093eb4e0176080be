"""Sparse-Transformer attention patterns for MST's Hybrid Sparse Attention (HSA), as boolean `[s, s]` masks
(True = query row may attend key column), always inside the causal triangle. Width/stride `w`:

    local    q - w < k <= q                       (a causal band of w keys)
    strided  k <= q and (q - k) mod w == 0         (every w-th key back from the query)
    sparse   local | strided
    fixed    causal blocks of w, plus the last column of every earlier block

The authors pass such a mask to SDPA (no compute saved); FLOP accounting credits `pattern_density`.
"""

from __future__ import annotations

import torch

PATTERNS = ("local", "strided", "sparse", "fixed")


def attention_pattern(pattern: str, seq_len: int, window: int, device=None) -> torch.Tensor:
    """The `[seq_len, seq_len]` boolean mask of `pattern` with width/stride `window`."""
    q = torch.arange(seq_len, device=device).unsqueeze(1)
    k = torch.arange(seq_len, device=device).unsqueeze(0)
    causal = k <= q
    if pattern == "local":
        return causal & (q - k < window)
    if pattern == "strided":
        return causal & ((q - k) % window == 0)
    if pattern == "sparse":
        return causal & ((q - k < window) | ((q - k) % window == 0))
    if pattern == "fixed":
        same_block = (q // window) == (k // window)
        block_summary = (k % window) == window - 1
        return causal & (same_block | block_summary)
    raise ValueError(f"--mst-hsa-pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")


def pattern_density(mask: torch.Tensor) -> float:
    """Allowed (query, key) pairs relative to dense causal attention (s (s + 1) / 2 pairs)."""
    s = mask.shape[-1]
    return float(mask.sum()) / (s * (s + 1) / 2)
