"""Tokens/s of one full training step, ours vs Hugging Face, on the same shape, batch and optimizer.

A step is: forward, loss, backward, AdamW step (fused where the device supports it, else foreach), and
zero_grad(set_to_none=True) — identical on both sides. LLaMA shape: ours (RMSNorm/SwiGLU/RoPE/GQA) vs
`transformers.LlamaForCausalLM`; GPT shape: ours (LayerNorm/GELU/learned positions, tied) vs
`transformers.GPT2LMHeadModel`; both HF models use attn_implementation="sdpa". Runs alternate ours/HF
for several rounds after warm-up, so machine noise hits both alike. fp32 on CPU by default.

    .venv/bin/python bench/train_step.py            # 4 layers, h 512, seq 256, batch 8, vocab 16000
    .venv/bin/python bench/train_step.py --compile  # also torch.compile'd ours (and HF) per round
    .venv/bin/python bench/train_step.py --layers 6 --hidden 384 --heads 6 --groups 2 --rounds 5

`--compile` compiles ours as `pretrain.py --torch-compile` does (each transformer layer in place,
`megatron_eff/training/compile.py`, on a copy of the model) and HF whole (`torch.compile(model)`).

The GEMM-only bound (`gemm-bound`, timed in the same rounds): every matrix product of the step, with the
step's shapes and operand layouts, as bare `torch.mm` / `torch.bmm` on random inputs: forward, input gradient
and weight gradient of every linear (QKV, attention output, MLP in/out, output layer), and attention's QK^T
and PV products with their four backward products (full s x s scores, so no causal saving: a causal kernel
that skips the masked blocks can beat this part of the bound) -- the FLOPs that
`megatron_eff/training/flops.py` counts for a step. Nothing else of a step (norms, softmax, elementwise ops,
the optimizer) is in it: ms/step over the bound's says how far a step is from its GEMMs alone.

Prints tokens/s and ms/step for each model and the ratios ours/HF, ours/bound and HF/bound. Figures are
measured, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_eff.config import ModelConfig  # noqa: E402
from megatron_eff.model.gpt_model import GPTModel  # noqa: E402
from megatron_eff.training.compile import compile_layers  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4, help="LLaMA query groups (GQA)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--warmup", type=int, default=2, help="steps per model before timing")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", default="llama,gpt")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def configs(args) -> dict[str, ModelConfig]:
    common = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                  seq_length=args.seq, vocab_size=args.vocab)
    return {
        "llama": ModelConfig(**common, num_query_groups=args.groups, position_embedding_type="rope",
                             normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                             untie_embeddings_and_output_weights=True),
        "gpt": ModelConfig(**common, max_position_embeddings=args.seq),
    }


def hf_model(kind: str, config: ModelConfig):
    import transformers

    vocab = config.padded_vocab_size(1)  # same GEMM sizes as ours
    if kind == "llama":
        hf_config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_query_groups, max_position_embeddings=config.seq_length,
            rms_norm_eps=config.norm_epsilon, tie_word_embeddings=False, use_cache=False,
            attn_implementation="sdpa",
        )
        return transformers.LlamaForCausalLM(hf_config)
    hf_config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
        n_layer=config.num_layers, n_head=config.num_attention_heads, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(hf_config)


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)


def ours_step(model, optimizer, tokens, labels):
    loss = model(tokens, labels).mean()  # per-token loss [b, s]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def hf_step(model, optimizer, tokens, labels):
    logits = model(input_ids=tokens).logits  # [b, s, V]; same next-token loss as ours
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def step_gemms(config: ModelConfig, batch: int, seq: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every matrix product of one training step: ("linear", (tokens, in, out)) for each linear layer (its
    forward, input-gradient and weight-gradient GEMMs) and ("attention", (batch * heads, seq, head_dim)) for
    each layer's attention (QK^T, PV and their four backward products)."""
    tokens, h, d = batch * seq, config.hidden_size, config.head_dim
    nq, g = config.num_attention_heads, config.num_query_groups
    linears = [(h, (nq + 2 * g) * d), (nq * d, h), (h, (2 if config.swiglu else 1) * config.ffn_hidden_size),
               (config.ffn_hidden_size, h)] * config.num_layers
    linears.append((h, config.padded_vocab_size(1)))  # the output layer
    return ([("linear", (tokens, k, n)) for k, n in linears]
            + [("attention", (batch * nq, seq, d))] * config.num_layers)


def gemm_bound_runner(config: ModelConfig, batch: int, seq: int, device: str):
    """A function that runs every GEMM of one step (`step_gemms`) on preallocated random inputs, with the
    operand layouts the step itself uses (a weight stored `[out, in]`, so the forward multiplies by its
    transpose, as `F.linear` does; the weight gradient is `dy^T x`, as autograd computes it), since the BLAS
    kernel, and so the time, depends on which operands are transposed."""
    products = []
    for kind, dims in step_gemms(config, batch, seq):
        if kind == "linear":  # y = x w^T; dx = dy w; dw = dy^T x
            tokens, k, n = dims
            x, w, dy = (torch.randn(shape, device=device) for shape in ((tokens, k), (n, k), (tokens, n)))
            products += [(torch.mm, x, w.t()), (torch.mm, dy, w), (torch.mm, dy.t(), x)]
        else:  # scores = q k^T, out = p v; dp = do v^T, dv = p^T do, dq = ds k, dk = ds^T q (full s x s)
            bh, s, hd = dims
            q, k, v, do = (torch.randn(bh, s, hd, device=device) for _ in range(4))
            p = torch.randn(bh, s, s, device=device)
            products += [(torch.bmm, q, k.transpose(1, 2)), (torch.bmm, p, v), (torch.bmm, do, v.transpose(1, 2)),
                         (torch.bmm, p.transpose(1, 2), do), (torch.bmm, p, k), (torch.bmm, p.transpose(1, 2), q)]

    def run():
        for product, a, b in products:
            product(a, b)

    return run


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(runner, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, fp32")
    for kind in args.models.split(","):
        config = configs(args)[kind]
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)
        labels = tokens.roll(-1, dims=1)
        ours = GPTModel(config).to(args.device).train()
        hf = hf_model(kind, config).to(args.device).train()
        variants = {"ours": (ours, ours_step), "hf": (hf, hf_step)}
        if args.compile:
            compiled = copy.deepcopy(ours)
            compile_layers([compiled])  # as --torch-compile: each layer in place
            variants["ours+compile"] = (compiled, ours_step)
            variants["hf+compile"] = (torch.compile(hf), hf_step)
        runners = {}
        for name, (model, step) in variants.items():
            optimizer = optimizer_for(model)
            runners[name] = lambda m=model, o=optimizer, s=step, t=tokens, y=labels: s(m, o, t, y)
        runners["gemm-bound"] = gemm_bound_runner(config, args.batch, args.seq, args.device)
        for runner in runners.values():
            time_steps(runner, args.warmup, args.device)
        hf_params = sum(p.numel() for p in hf.parameters())
        fused = optimizer_for(ours).defaults.get("fused")
        shape = (f"{config.num_layers} layers, h {config.hidden_size}, heads {config.num_attention_heads}/"
                 f"{config.num_query_groups} groups, ffn {config.ffn_hidden_size}, seq {args.seq}, "
                 f"batch {args.batch}, vocab {config.padded_vocab_size(1)}")
        print(f"\n{kind}: {shape}; params ours {ours.num_parameters() / 1e6:.1f}M, hf {hf_params / 1e6:.1f}M;"
              f" {'fused' if fused else 'foreach'} AdamW")
        seconds = {name: 0.0 for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                seconds[name] += time_steps(runner, args.steps, args.device)
        tokens_per_step = args.batch * args.seq * args.steps * args.rounds
        rate = {name: tokens_per_step / s for name, s in seconds.items()}
        ms = {name: 1000 * s / (args.steps * args.rounds) for name, s in seconds.items()}
        for name, value in rate.items():
            print(f"  {name:14s} {value:10.0f} tokens/s {ms[name]:9.1f} ms/step")
        print(f"  ratio ours/hf  {rate['ours'] / rate['hf']:.2f}x")
        over = ", ".join(f"{name} {ms[name] / ms['gemm-bound']:.2f}x" for name in variants)
        print(f"  time over the GEMM-only bound: {over}")
        if args.compile:
            print(f"  ratio ours+compile/hf  {rate['ours+compile'] / rate['hf']:.2f}x, "
                  f"ours+compile/hf+compile  {rate['ours+compile'] / rate['hf+compile']:.2f}x")


if __name__ == "__main__":
    main()
