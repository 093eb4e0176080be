"""The factorized Sparse-Transformer attention (`sparse_attention`) against SDPA with the pattern's boolean
mask: outputs and gradients, the size of what it computes, and a tiny MST run with either `--mst-hsa-impl`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_eff.methods.mst import method as mst_lib
from megatron_eff.methods.mst.attention_patterns import PATTERNS, attention_pattern, masked_sdpa, sparse_attention
from tests.test_mst import FLAGS, run

# (s, w): s a multiple of w, s not a multiple of w, w = 1, w = s, w > s, a single position
SHAPES = [(16, 4), (13, 4), (10, 3), (9, 1), (7, 7), (5, 9), (1, 3)]
HEADS = [(4, 4), (4, 2), (3, 1)]  # (query heads, K/V groups): MHA, GQA, MQA


def _qkv(s, heads, groups, d=8, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, heads, s, d), (b, groups, s, d), (b, groups, s, d)]
    return [torch.randn(shape, generator=g).requires_grad_() for shape in shapes]


def _reference(q, k, v, pattern, window):
    mask = attention_pattern(pattern, q.shape[2], window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("heads,groups", HEADS)
def test_matches_sdpa_with_the_mask_forward_and_backward(pattern, heads, groups):
    for s, w in SHAPES:
        q, k, v = _qkv(s, heads, groups)
        out = sparse_attention(q, k, v, pattern, w)
        ref = _reference(q, k, v, pattern, w)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=f"{pattern} s={s} w={w}")
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        for name, a, b in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"d{name}: {pattern} s={s} w={w}")


def test_scale_and_non_contiguous_inputs():
    q, k, v = _qkv(12, 4, 2)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # [b, s, h, d] memory
    out = sparse_attention(qt, kt, vt, "sparse", 4, scale=0.3)
    mask = attention_pattern("sparse", 12, 4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_only_overlap_of_local_and_strided_is_the_diagonal():
    """`sparse` drops k == q from its strided part: that must be the whole overlap, or a key counts twice."""
    for s, w in SHAPES:
        local, strided = attention_pattern("local", s, w), attention_pattern("strided", s, w)
        assert torch.equal(local & strided, torch.eye(s, dtype=torch.bool)), (s, w)


def test_dropout_keeps_the_expected_output():
    q, k, v = (x.detach() for x in _qkv(64, 4, 4, b=8))
    ones = torch.ones_like(v)  # output = sum of the kept probabilities / (1 - p): 1 in expectation
    torch.manual_seed(0)
    out = sparse_attention(q, k, ones, "sparse", 8, dropout_p=0.5)
    assert not torch.allclose(out, torch.ones_like(out))
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    torch.testing.assert_close(sparse_attention(q, k, ones, "sparse", 8), torch.ones_like(out))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward run through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_tensor(fn, s, heads=2, groups=1):
    q, k, v = _qkv(s, heads, groups, b=1)
    with LargestTensor() as seen:
        fn(q, k, v).sum().backward()
    return seen.numel


@pytest.mark.parametrize("pattern", PATTERNS)
def test_never_builds_an_s_by_s_tensor(pattern):
    s, w, heads = 256, 16, 2
    largest = _largest_tensor(lambda q, k, v: sparse_attention(q, k, v, pattern, w), s, heads)
    assert largest <= heads * s * (2 * w + s // w)  # per head: [nb, w, 2w] band + [nb, w, nb] strided keys
    assert largest < s * s
    # the same check fails on the mask path: SDPA turns the mask into [s, s] additive scores
    mask = attention_pattern(pattern, s, w)
    assert _largest_tensor(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                           s, heads) >= s * s


@pytest.mark.parametrize("pattern", ["sparse", "fixed"])
def test_mst_run_factorized_matches_mask(monkeypatch, pattern):
    flags = [*FLAGS, "--train-iters", "14", "--mst-phase-iters", "4,8,2", "--mst-hsa-pattern", pattern]
    calls, masked_calls = [], []

    def counted(function, calls):
        def wrapped(*args, **kwargs):
            calls.append(1)
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(mst_lib, "sparse_attention", counted(sparse_attention, calls))
    monkeypatch.setattr(mst_lib, "masked_sdpa", counted(masked_sdpa, masked_calls))
    factorized = run([*flags, "--mst-hsa-impl", "factorized"])
    assert len(calls) == 8 * 2 * 2 and not masked_calls  # HSA iterations x micro-batches x layers
    masked = run([*flags, "--mst-hsa-impl", "mask"])
    assert len(calls) == 8 * 2 * 2 and len(masked_calls) == 8 * 2 * 2  # the mask impl: the masked SDPA path
    assert len(factorized.losses) == 14
    assert factorized.losses == pytest.approx(masked.losses, rel=1e-5)
