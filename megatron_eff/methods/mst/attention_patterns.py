"""Sparse-Transformer attention patterns for MST's Hybrid Sparse Attention (HSA), as boolean `[s, s]` masks
(True = query row may attend key column), always inside the causal triangle. Width/stride `w`:

    local    q - w < k <= q                       (a causal band of w keys)
    strided  k <= q and (q - k) mod w == 0         (every w-th key back from the query)
    sparse   local | strided
    fixed    causal blocks of w, plus the last column of every earlier block

The authors pass such a mask to SDPA, which still scores all s x s pairs (`masked_sdpa`, `--mst-hsa-impl
mask`, kept as the reference). `sparse_attention` (`--mst-hsa-impl factorized`, the default) computes only
the pattern's scores, Sparse Transformer's factorised form in plain PyTorch (autograd does the backward): with
positions p = j w + c (block j, offset c; s is padded to a multiple of w), local reads key blocks j-1 and j
(`[nb, w, 2w]` scores), strided reads the keys of the same residue c (`[nb, w, nb]`), sparse both (the
strided part without k == q, their only common key), fixed the causal block (`[nb, w, w]`) plus the nb
block-summary keys. One softmax runs over the concatenated scores, so the result equals the masked SDPA;
memory and work are O(s (w + s/w)) per head instead of O(s^2). FLOP accounting credits `pattern_density`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                dropout_p: float = 0.0) -> torch.Tensor:
    """`--mst-hsa-impl mask`: SDPA over all s x s scores with `mask[:s, :s]` (True = attend) as boolean mask.
    SDPA layout as `sparse_attention`: q `[b, nq, s, d]`, k/v `[b, g, s, d]` -> `[b, nq, s, d]`."""
    s = q.shape[2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:s, :s], dropout_p=dropout_p,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, window: int,
                     scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention restricted to `pattern` (width/stride `window`), computing only the pattern's scores.

    SDPA layout: q `[b, nq, s, d]`, k/v `[b, g, s, d]` with `g` dividing `nq` (GQA: query head h reads K/V
    group h // (nq / g), as SDPA's `enable_gqa`). Returns `[b, nq, s, d]`, equal to SDPA with
    `attention_pattern(pattern, s, window)` as boolean mask. `dropout_p` drops attention probabilities
    like SDPA (not the same random draws).
    """
    b, nq, s, d = q.shape
    g = k.shape[1]
    w = min(window, s)  # every pattern with w >= s is the same as with w = s
    nb = -(-s // w)
    pad = nb * w - s  # padded queries/keys sit after the real ones, so causality hides them from real queries
    scale = d ** -0.5 if scale is None else scale
    # positions p = j w + c: [b, g, nq/g, nb, w, d] for q, [b, g, nb, w, d] for k/v (broadcast, not copied)
    qb = F.pad(q * scale, (0, 0, 0, pad)).reshape(b, g, nq // g, nb, w, d)
    kb, vb = (F.pad(x, (0, 0, 0, pad)).reshape(b, g, nb, w, d) for x in (k, v))
    parts = _pattern_parts(pattern, kb, vb, nb, w)
    # One softmax over the concatenated keys of all parts; their key sets are disjoint.
    scores = [torch.einsum(f"bgrjcd,{spec}->bgrjc{x}", qb, keys).masked_fill(~mask, -math.inf)
              for spec, x, keys, _, mask in parts]  # [b, g, nq/g, nb, w, keys of the part]
    probs = (scores[0] if len(scores) == 1 else torch.cat(scores, -1)).softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    probs = probs.split([t.shape[-1] for t in scores], -1)
    out = sum(torch.einsum(f"bgrjc{x},{spec}->bgrjcd", p, values) for p, (spec, x, _, values, _) in zip(probs, parts))
    return out.reshape(b, nq, nb * w, d)[:, :, :s]  # [b, nq, s, d]


def _pattern_parts(pattern: str, kb: torch.Tensor, vb: torch.Tensor, nb: int, w: int) -> list[tuple]:
    """The pattern as disjoint key sets, each (einsum spec of its keys, key index, keys, values, boolean mask
    broadcastable to its scores' `[nb, w, keys]`): query (j, c) is position j w + c."""
    device = kb.device
    j = torch.arange(nb, device=device).view(nb, 1, 1)  # query block
    c = torch.arange(w, device=device).view(1, w, 1)  # query position within its block
    key_block = torch.arange(nb, device=device).view(1, 1, nb)
    if pattern == "fixed":  # causal inside the block, plus the last key of every earlier block
        t = torch.arange(w, device=device).view(1, 1, w)
        return [("bgjtd", "t", kb, vb, t <= c), ("bgkd", "k", kb[:, :, :, -1], vb[:, :, :, -1], key_block < j)]
    parts = []
    if pattern in ("local", "sparse"):  # query block j reads key blocks j-1 and j: key t is position (j-1) w + t
        t = torch.arange(2 * w, device=device).view(1, 1, 2 * w)
        band = (c < t) & (t <= c + w) & ((j > 0) | (t >= w))  # q - w < k <= q, not before position 0
        parts.append(("bgjtd", "t", _with_previous_block(kb), _with_previous_block(vb), band))
    if pattern in ("strided", "sparse"):  # residue class c: keys j' w + c with j' <= j (sparse: k == q is local)
        parts.append(("bgkcd", "k", kb, vb, key_block < j if parts else key_block <= j))
    if not parts:
        raise ValueError(f"--mst-hsa-pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    return parts


def _with_previous_block(x: torch.Tensor) -> torch.Tensor:
    """`[b, g, nb, w, d]` -> `[b, g, nb, 2w, d]`: block j-1 (zeros for j = 0) followed by block j."""
    return torch.cat([F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1], x], dim=-2)
