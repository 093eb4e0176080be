"""Generation (`megatron_eff/generation.py`, `tools/generate.py`): KV-cached decoding equals recomputing the
whole context, greedy tokens equal Hugging Face `generate` on the converted model, sampling filters."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_eff.config import ModelConfig
from megatron_eff.generation import filter_logits, generate
from megatron_eff.model.inference_cache import InferenceCache
from tests.hf_utils import GPT2, LLAMA, ids, random_model, save_ours

SHAPES = {"llama-gqa": LLAMA, "gpt2": GPT2}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cached_forward_matches_full_forward(shape):
    """Prefill 5 tokens, then a chunk of 4 (needs the offset causal mask), then single tokens."""
    model = random_model(ModelConfig(**shape))
    tokens = ids(300, batch=2, seq=12)
    cache = InferenceCache(max_length=16)
    with torch.no_grad():
        full = model(tokens)
        pieces = [model(tokens[:, a:b], inference_cache=cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))]
    assert cache.offset == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cached_generation_equals_uncached(shape):
    config = ModelConfig(**{**shape, "seq_length": 16})  # 40 new tokens: the window slides past 16
    model = random_model(config)
    prompt = [5, 17, 42, 9, 250]
    for sampling in ({}, {"temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 3}):
        cached = generate(model, prompt, 40, config.vocab_size, **sampling)
        uncached = generate(model, prompt, 40, config.vocab_size, use_cache=False, **sampling)
        assert cached == uncached and len(cached) == 40


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_greedy_matches_huggingface_generate(shape):
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from megatron_eff.hf.mapping import build_hf_model, to_hf

    config = ModelConfig(**{**shape, "init_method_std": 0.2})  # larger weights: a varied greedy continuation
    model = random_model(config)
    hf = build_hf_model(*to_hf({n: p.detach() for n, p in model.named_parameters()}, config))
    prompt = [11, 200, 3, 77, 150, 9]
    ours = generate(model, prompt, 20, config.vocab_size)
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs and len(set(ours)) > 5


def test_filter_logits_top_k_top_p_and_padding():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 9.0, 9.0]])  # ids 4, 5 are vocabulary padding
    kept = lambda x: torch.isfinite(x[0]).nonzero().flatten().tolist()
    assert kept(filter_logits(logits, 4)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, 4, top_k=2)) == [0, 1]
    probs = torch.tensor([4.0, 3.0, 2.0, 1.0]).softmax(0)  # 0.64, 0.24, 0.09, 0.03
    assert probs[0] < 0.7 < probs[:2].sum()
    assert kept(filter_logits(logits, 4, top_p=0.7)) == [0, 1]  # the token crossing top_p is kept
    assert kept(filter_logits(logits, 4, top_p=0.5)) == [0]


def test_generate_tool_cached_and_uncached(tmp_path):
    from tests.dist_utils import ROOT

    config = ModelConfig(**{**LLAMA, "vocab_size": 201})  # NullTokenizer: ids 0..199 and eod 200
    model = random_model(config)
    save_ours(model, tmp_path / "ckpt")
    prompt = "5 17 42 9"
    expected = generate(model, [5, 17, 42, 9], 12, 201, eod=200)
    outputs = []
    for extra in ([], ["--no-kv-cache"]):
        cmd = [sys.executable, str(ROOT / "tools" / "generate.py"), "--load", str(tmp_path / "ckpt"), "--prompt",
               prompt, "--max-new-tokens", "12", "--device", "cpu", *extra]  # `expected` ran on the CPU
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout.strip())
    assert outputs[0] == outputs[1] == " ".join(map(str, [5, 17, 42, 9, *expected]))
