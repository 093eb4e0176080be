"""Text generation from a trained model: greedy, temperature, top-k and top-p (nucleus) sampling.

Single process, no KV cache yet: each new token re-runs the (short) context through the model, which is
what the quickstart and small models need. Padded vocabulary entries (ids >= the tokenizer's vocabulary)
are never sampled.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, vocab_size: int, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask padded ids, then keep the top-k ids and the smallest set whose probability reaches top-p."""
    logits = logits.float().clone()  # [b, v_padded]
    logits[..., vocab_size:] = float("-inf")
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, vocab_size), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the token that crosses top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_token(logits: torch.Tensor, vocab_size: int, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[b, v_padded]` logits -> `[b]` ids. temperature 0 is greedy."""
    if temperature <= 0:
        return filter_logits(logits, vocab_size).argmax(dim=-1)
    filtered = filter_logits(logits / temperature, vocab_size, top_k, top_p)
    return torch.multinomial(filtered.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, vocab_size: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eod: int | None = None, seed: int = 0) -> list[int]:
    """Continue `prompt_ids`; stops early at `eod`. The context is cut to the model's sequence length."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    max_context = model.config.seq_length
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-max_context:]], dtype=torch.long)
        logits = model(tokens=context)[:, -1]  # [1, v_padded]
        token = next_token(logits, vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=generator).item()
        ids.append(token)
        if eod is not None and token == eod:
            break
    return ids[len(prompt_ids):]
