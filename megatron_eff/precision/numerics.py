"""Small numerics studies on CPU (used by tests/test_unit_scaling.py and bench/precision.py).

- `train_synthetic(flags, steps)`: train a model built from command-line flags on a learnable synthetic
  task (a noisy bigram: the next token is `perm[token]` with probability 1/2, else uniform), through the
  real `train_step` (loss scaling, FP8 updates, unit scaling); returns the per-step losses.
- `init_statistics(flags)`: one forward/backward at init; the std of every layer's and linear's output and of
  its gradient, and of every parameter's gradient (Unit Scaling's claim: all ~1).
- `gradient_underflow(flags)`: one forward/backward at init; the fraction of weight-gradient elements
  that are exactly zero, and below FP16's smallest normal, next to an FP32 backward of the same model.
"""

from __future__ import annotations

import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.parallel.state import ParallelState
from megatron_eff.precision import PrecisionRuntime


def synthetic_batches(vocab: int, seq_length: int, batch: int, seed: int = 0):
    """Endless micro-batches {"tokens", "labels"} `[b, s]` of the noisy-bigram task."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=gen)
    while True:
        seq = torch.empty(batch, seq_length + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for i in range(seq_length):
            noise = torch.randint(0, vocab, (batch,), generator=gen)
            keep = torch.rand(batch, generator=gen) < 0.5
            seq[:, i + 1] = torch.where(keep, perm[seq[:, i]], noise)
        yield {"tokens": seq[:, :-1], "labels": seq[:, 1:]}


def _build(flags: list[str]):
    from megatron_eff.training import trainer as loop

    config = config_from_args(parse_args([*flags, "--mock-data"]))
    pstate = ParallelState.single()
    loop.set_seed(config.train.seed)
    model = loop.build_model(config, pstate, torch.device("cpu"))
    return config, pstate, model


def train_synthetic(flags: list[str], steps: int) -> list[float]:
    from megatron_eff.training import trainer as loop
    from megatron_eff.training.optimizer import build_optimizer

    config, pstate, model = _build(flags)
    params = {name: p for chunk in model for name, p in chunk.named_parameters()}
    optimizer = build_optimizer(params.items(), config.optim)
    precision = PrecisionRuntime(config, model, pstate)
    autocast = precision.wrap_autocast(loop.autocast_context(config, torch.device("cpu")))
    batches = synthetic_batches(config.model.vocab_size, config.model.seq_length, config.train.micro_batch_size)
    m = config.train.num_micro_batches(1)
    losses = []
    for _ in range(steps):
        result = loop.train_step(model, optimizer, batches, m, config, pstate, config.optim.lr, autocast,
                                 precision=precision)
        losses.append(result.loss)
    return losses


def gradient_underflow(flags: list[str], prefix: str = "") -> dict[str, float]:
    """{"zero": fraction of weight-gradient elements exactly 0, "subnormal": fraction below FP16's smallest
    normal (6.1e-5), "fp32_zero": the zero fraction of the same backward in FP32 (FP8 links, if any, stay)}
    over the weights whose name starts with `prefix` ("decoder.": the FP8 linears)."""
    from megatron_eff.training import trainer as loop

    config, pstate, model = _build(flags)
    batch = next(synthetic_batches(config.model.vocab_size, config.model.seq_length, config.train.micro_batch_size))
    stats = {}
    for name, autocast in (("", loop.autocast_context(config, torch.device("cpu"))), ("fp32_", None)):
        for chunk in model:
            chunk.zero_grad(set_to_none=True)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            loss = model[0](tokens=batch["tokens"], labels=batch["labels"]).float().mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model[0].named_parameters()
                           if p.grad is not None and p.ndim >= 2 and n.startswith(prefix)])
        stats[f"{name}zero"] = (grads == 0).float().mean().item()
        stats[f"{name}subnormal"] = (grads.abs() < torch.finfo(torch.float16).tiny).float().mean().item()
    return stats


def init_statistics(flags: list[str], seed: int = 0) -> dict[str, float]:
    """{"<module> activation" | "<module> gradient" | "<param> weight gradient": std} after one forward and
    backward (of the mean per-token loss) at init, on random tokens. Modules: the embedding, every
    transformer layer and every layer linear."""
    config, _, (model,) = _build(flags)
    stats = {}

    def track(name):
        def hook(module, inputs, out):
            stats[f"{name} activation"] = out.detach().float().std().item()
            out.register_hook(lambda g: stats.__setitem__(f"{name} gradient", g.float().std().item()))
        return hook

    for name, module in model.named_modules():
        if name == "embedding" or name.endswith(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")) or (
                name.startswith("decoder.layers.") and name.count(".") == 2):
            module.register_forward_hook(track(name))
    gen = torch.Generator().manual_seed(seed)
    shape = (config.train.micro_batch_size, config.model.seq_length)
    tokens, labels = (torch.randint(0, config.model.vocab_size, shape, generator=gen) for _ in range(2))
    model(tokens=tokens, labels=labels).mean().backward()
    stats.update({f"{n} weight gradient": p.grad.std().item() for n, p in model.named_parameters()
                  if p.grad is not None and p.numel() > 1})
    return stats


def layer_gradient_profile(flags: list[str]) -> list[float]:
    """std of the gradient at each transformer layer's output (the residual stream), layer 0 first."""
    stats = init_statistics(flags)
    layers = sorted(int(k.split(" ")[0].split(".")[2]) for k in stats if k.startswith("decoder.layers.") and
                    k.endswith(" gradient") and k.count(".") == 2)
    return [stats[f"decoder.layers.{i} gradient"] for i in layers]


def weight_gradients(flags: list[str], prefix: str = "decoder.", num_micro_batches: int = 1) -> dict[str, torch.Tensor]:
    """The weight gradients (names starting with `prefix`) of one micro-batch's forward/backward at init on the
    synthetic task, in the run's precision (autocast, FP8 links), its loss scaled as `train_step` scales it
    when a step accumulates `num_micro_batches` (1/M, times the precision runtime's loss scale: M under Unit
    Scaling) and the gradients unscaled after. Same weights and batch for any flags that keep the shape."""
    from megatron_eff.training import trainer as loop

    config, pstate, model = _build(flags)
    batch = next(synthetic_batches(config.model.vocab_size, config.model.seq_length, config.train.micro_batch_size))
    loss_scale = PrecisionRuntime(config, model, pstate).loss_scale(num_micro_batches)
    with loop.autocast_context(config, torch.device("cpu"))():
        loss = model[0](tokens=batch["tokens"], labels=batch["labels"]).float().mean()
    (loss * loss_scale / num_micro_batches).backward()
    return {n: p.grad.float() / loss_scale for n, p in model[0].named_parameters()
            if p.grad is not None and p.ndim >= 2 and n.startswith(prefix)}


def gradient_error(flags: list[str], reference_flags: list[str], prefix: str = "decoder.",
                   num_micro_batches: int = 1) -> float:
    """Relative L2 error of `flags`' weight gradients against `reference_flags`' (e.g. FP8 vs the same model in
    FP32): ||g - g_ref|| / ||g_ref|| over all weights starting with `prefix` (`weight_gradients`)."""
    got, want = (weight_gradients(f, prefix, num_micro_batches) for f in (flags, reference_flags))
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want])
    return (diff.norm() / torch.cat([g.flatten() for g in want.values()]).norm()).item()
