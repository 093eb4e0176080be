"""Text generation from a trained model: greedy, temperature, top-k and top-p (nucleus) sampling.

Single process, on the model's device (CPU or one GPU), with a KV cache (`InferenceCache`): the prompt is run
once, then each new token is one position through the model. The context is at most the model's `seq_length`
tokens: when it is full the window slides and the cache is rebuilt from the last `seq_length` tokens (exactly
what the uncached path, `use_cache=False`, computes every step). Padded vocabulary entries (ids >= the
tokenizer's vocabulary) are never sampled. Sampling draws from a generator on the model's device, so a seed
gives the same tokens on every run on one device (CPU and GPU draws differ).
"""

from __future__ import annotations

import torch

from megatron_eff.model.inference_cache import InferenceCache


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
             top_k: int = 0, top_p: float = 1.0, eod: int | None = None, seed: int = 0,
             use_cache: bool = True) -> list[int]:
    """Continue `prompt_ids`; stops early at `eod`. The context is cut to the model's sequence length."""
    if not prompt_ids:
        raise ValueError("generate: the prompt needs at least one token")
    model.eval()
    device = next(model.parameters()).device  # inputs go where the model is; so does the sampler's generator
    generator = torch.Generator(device=device).manual_seed(seed)
    max_context = model.config.seq_length
    cache = InferenceCache(max_context) if use_cache else None
    ids = list(prompt_ids)
    pending = ids[-max_context:]  # tokens the model has not seen yet
    for _ in range(max_new_tokens):
        if cache is not None and cache.offset + len(pending) > max_context:  # window full: slide it
            cache.reset()
            pending = ids[-max_context:]
        context = torch.tensor([pending if cache is not None else ids[-max_context:]], dtype=torch.long,
                               device=device)
        logits = model(tokens=context, inference_cache=cache)[:, -1]  # [1, v_padded]
        token = next_token(logits, vocab_size, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=generator).item()
        ids.append(token)
        pending = [token]
        if eod is not None and token == eod:
            break
    return ids[len(prompt_ids):]
