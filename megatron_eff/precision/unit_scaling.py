"""Unit Scaling (Blake, Orr, Luschi 2023, arXiv 2303.11257; rules of the `unit-scaling` library v0.1).

Every weight, activation and gradient has ~unit variance at initialisation, so FP16/FP8 training needs no
loss scaling. A scaled op is y = alpha * f(x) in forward with the gradient of input i multiplied by beta_i
in backward; two primitives make any op scaled: `scale_fwd(x, a)` and `scale_bwd(x, b)`.

`apply_unit_scaling(model, ...)` transforms a built `GPTModel` chunk (before its weights are initialised):

Rules used (v0.1's unless marked *ours* or *u-muP*, the library's current version):
- init: every "normal" weight (linears, embeddings, output layer) N(0, 1); biases 0, norm weights 1.
- linear X[b x m] W[n x m]^T: alpha = beta_X = (m n)^-1/4 (gmean of m^-1/2 and n^-1/2: a non-cut edge),
  beta_W = beta_bias = b^-1/2 (b = tokens of the micro-batch); global m, n under TP.
- output layer: alpha = h^-1/2, beta_X = V^-1/2, unconstrained (v0.1's rule for the final projection: every
  gradient of the model passes through this edge, so a different backward scale rescales all of them alike;
  it keeps logits and the gradient at the final norm unit).
- GELU: alpha = beta = gmean(1/0.588, 1/0.675) = 1.587 for unit inputs (the paper's); SwiGLU:
  gmean(1/0.597, 1/0.606) = 1.663 from E[silu(z)^2], E[silu'(z)^2] (*ours*: v0.1 has no SwiGLU). Both are
  evaluated by quadrature at fc1's actual output std (m/n)^1/4 under the gmean rule (*ours*), and folded
  into fc2's input.
- attention: the SDPA output times sqrt(s / H_s), H_s = sum_t 1/t: uniform causal attention at init
  averages t unit values at position t, mean variance H_s / s (*ours*, "almost-scaled"); folded into
  linear_proj's input. The q.k logits are *not* unit: q and k leave the QKV GEMM with std (m/n)^1/4 under
  the gmean rule (m = h, n = the fused QKV width), so SDPA's q.k / sqrt(d) has std (m/n)^1/2 (0.71 on
  llama-tiny); left as is.
- residual: x + f(x) -> sqrt(1 - tau) x + sqrt(tau) f(x), the branch's sqrt(tau) applied to its gradient
  at the split and to its value at the add (`residual_split` / `residual_add`). tau per branch from
  `--unit-scaling-residual`: `depth` (default, *u-muP*'s depth rule, `depth_residual_rule`: tau ~ 1/(L + i)
  for the i-th of 2L branches) or `fixed` (v0.1: tau_attn = 0.01, tau_mlp = 0.5 for every layer). With
  fixed taus a branch whose backward gain g is not 1 multiplies the residual gradient by
  sqrt(1 - tau + tau g^2) per layer: SwiGLU's MLP (g ~ 1.45) grows it ~1.25x per layer going back (x145 at
  24 layers); the depth rule's taus shrink with depth, so the product stays bounded (0.70-1.03 at 24).
- word embedding: weight-gradient scale sqrt(V / tokens). Learned positions: word + position is an add,
  times 2^-1/2 in forward and backward; position-table weight-gradient scale b^-1/2 (b = sequences).
- softmax cross-entropy: the logits' gradient times tokens * V / sqrt(V - 1): the loss is reported as the
  mean and back-propagated as the sum (folded into the output GEMM).
- norms: alpha = 1; norm weights/biases and row-parallel biases (added after the GEMM) get weight-gradient
  scale tokens^-1/2, as the column-parallel biases inside the scaled GEMM do (their gradient is a sum over
  tokens; unscaled it dominates gradient clipping).
- dropout is refused (`PrecisionConfig.check_run`): its 1/(1-p) rescaling is not unit-scaled.
- optimiser (`lr_scale` on each parameter, turned into param groups by `training/optimizer.py`; *u-muP*'s
  idea, our multipliers): a weight multiplied by c in forward gets LR x 1/c, so AdamW moves c W -- the
  weight the model uses -- by about the LR, as in the standard parametrisation at the same `--lr`; weight
  decay is divided by the same factor (LR-independent). `--no-unit-scaling-lr-scaling` turns it off.

Gradient accumulation: the schedules scale each micro-batch's loss by 1/M; the trainer multiplies the
loss scale by M under unit scaling (and divides the summed gradients by M afterwards), so each
micro-batch's backward stays unit-scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.autograd import forward_backward_function
from megatron_eff.model.norms import LayerNorm, RMSNorm
from megatron_eff.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_eff.precision.gemm import UNIT_SCALING_DEPTH, GemmLink, add_link


def activation_scale(swiglu: bool, sigma: float = 1.0) -> float:
    """gmean(alpha, beta) of GELU (tanh) or SwiGLU for N(0, sigma^2) inputs, by quadrature. sigma = 1, GELU:
    gmean(1/0.588, 1/0.675) = 1.587 (the paper's numbers); SwiGLU: gmean(1/0.597, 1/0.606) = 1.663."""
    z = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64, requires_grad=True)
    weight = torch.exp(-z.detach() ** 2 / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0]).item()
    with torch.enable_grad():  # also when a model is built under no_grad (tools)
        f = F.silu(sigma * z) if swiglu else F.gelu(sigma * z, approximate="tanh")
        (df,) = torch.autograd.grad(f.sum(), z)  # = sigma f'(sigma z)
    mean = lambda t: float((t.detach() ** 2 * weight).sum())  # noqa: E731  E[t^2]
    if swiglu:  # silu(a) * b, a and b ~ N(0, sigma^2)
        alpha = 1.0 / math.sqrt(mean(f) * sigma**2)
        beta = 1.0 / math.sqrt((mean(df) + mean(f)) / 2)  # grads of a: b silu'(a), of b: silu(a)
    else:  # GELU's output std (mean removed), gradient rms
        alpha = 1.0 / math.sqrt(mean(f) - float((f.detach() * weight).sum()) ** 2)
        beta = sigma / math.sqrt(mean(df))
    return math.sqrt(alpha * beta)


_scale_fwd = forward_backward_function("_ScaleFwd", lambda x, scale: x * scale, lambda grad, scale: grad)
_scale_bwd = forward_backward_function("_ScaleBwd", lambda x, scale: x.view_as(x), lambda grad, scale: grad * scale)


def scale_fwd(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x * scale in forward; the gradient passes unchanged."""
    return _scale_fwd(x, scale)


def scale_bwd(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in forward; the gradient is multiplied by `scale`."""
    return _scale_bwd(x, scale)


def tokens_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class UnitScaledGemm(GemmLink):
    """A link of a linear's GEMM chain (`precision/gemm.py`): unit-scaling factors around the inner GEMM
    (the kernel, or `fp8.Fp8Gemm`: the quantiser then sees the unit-scaled tensors).

    `input_scale` multiplies the input in forward and backward (a folded GELU / attention scale);
    `output_grad_scale(tokens)` scales the output's gradient (the folded cross-entropy rule)."""

    depth = UNIT_SCALING_DEPTH

    def __init__(self, fan_in: int, fan_out: int, inner=F.linear, input_scale: float = 1.0,
                 output_grad_scale=None, constrain: bool = True):
        # alpha = fan_in^-1/2 and beta_x = fan_out^-1/2, constrained to their geometric mean on a non-cut edge
        self.scale = self.grad_scale = (fan_in * fan_out) ** -0.25
        if not constrain:  # an edge every gradient passes through (the output layer): free to differ
            self.scale, self.grad_scale = fan_in**-0.5, fan_out**-0.5
        self.inner, self.input_scale, self.output_grad_scale = inner, input_scale, output_grad_scale

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        tokens = tokens_of(x)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        x = scale_bwd(x, self.grad_scale)
        weight = scale_bwd(weight, tokens**-0.5)
        y = scale_fwd(self.inner(x, weight, None), self.scale)
        if bias is not None:
            y = y + (scale_bwd(bias, tokens**-0.5) if bias.requires_grad else bias)
        if self.output_grad_scale is not None:
            y = scale_bwd(y, self.output_grad_scale(tokens))
        return y


def attention_output_scale(seq_length: int) -> float:
    """sqrt(s / H_s): the inverse std of a uniform causal average of unit values, over positions."""
    harmonic = sum(1.0 / t for t in range(1, seq_length + 1))
    return math.sqrt(seq_length / harmonic)


ResidualRule = Callable[[int, str], float]  # (global layer index, "attention" | "mlp") -> tau


def fixed_residual_rule(tau_attn: float, tau_mlp: float) -> ResidualRule:
    """v0.1's rule: the same tau for every layer's attention branch and every layer's MLP branch."""
    return lambda layer, branch: tau_attn if branch == "attention" else tau_mlp


def depth_residual_rule(num_layers: int, mult: float = 1.0, attn_ratio: float = 1.0) -> ResidualRule:
    """The current library's depth rule (u-muP, Blake et al. 2024, appendix G): every attention branch adds
    the same variance, every MLP branch too, their total is `mult`^2 times the embedding's, attention : MLP
    is `attn_ratio`^2. The library's ratio r (branch : skip) of the i-th of the 2L residual adds is
    alpha_i / sqrt(L + sum of the earlier branches' alpha^2); our tau (the branch's share of the variance)
    is r^2 / (1 + r^2)."""
    alpha_mlp = mult * math.sqrt(2.0 / (1.0 + attn_ratio**2))
    alpha_attn = attn_ratio * alpha_mlp

    def tau(layer: int, branch: str) -> float:
        index = 2 * layer + (branch == "mlp")
        earlier_attn, earlier_mlp = (index + 1) // 2, index // 2
        alpha = alpha_attn if branch == "attention" else alpha_mlp
        r2 = alpha**2 / (num_layers + earlier_attn * alpha_attn**2 + earlier_mlp * alpha_mlp**2)
        return r2 / (1.0 + r2)

    return tau


def residual_rule(precision, num_layers: int) -> ResidualRule:
    """The rule `--unit-scaling-residual` selects (a `PrecisionConfig`)."""
    if precision.unit_scaling_residual == "fixed":
        return fixed_residual_rule(precision.unit_scaling_residual_tau_attn, precision.unit_scaling_residual_tau_mlp)
    return depth_residual_rule(num_layers, precision.unit_scaling_residual_mult,
                               precision.unit_scaling_residual_attn_ratio)


def _residual_ops(layer: int, rule: ResidualRule):
    """x + f(x) -> sqrt(1 - tau) x + sqrt(tau) f(x): sqrt(tau) on the branch's gradient at the split and on
    its value at the add, so forward and backward both mix unit tensors into a unit tensor."""
    taus = {branch: rule(layer, branch) for branch in ("attention", "mlp")}

    def split(x: torch.Tensor, branch: str):
        tau = taus[branch]
        return scale_bwd(x, math.sqrt(tau)), x * math.sqrt(1.0 - tau)  # (into the branch, skip)

    def add(y: torch.Tensor, skip: torch.Tensor, branch: str) -> torch.Tensor:
        return skip + scale_fwd(y, math.sqrt(taus[branch]))

    return split, add


def _embedding_grad_hook(vocab_size: int):
    def hook(module, inputs, output):
        return scale_bwd(output, math.sqrt(vocab_size / inputs[0].numel()))

    return hook


def _add_position_scales(embedding: nn.Module) -> None:
    """word + position is an add: times 2^-1/2 in forward *and* backward (scaling the forward only would leave
    each input's gradient sqrt(2) too large: with tied embeddings, the lookup's share of the tied weight's
    gradient). The position table's gradient sums over the batch b: weight-gradient scale b^-1/2 (b read from
    the tokens `[b, s]` of the last forward)."""
    batch = {"size": 1}

    def add_hook(module, inputs, output):
        batch["size"] = inputs[0].shape[0]
        return output * 2**-0.5

    embedding.register_forward_hook(add_hook)
    embedding.position_embeddings.weight.register_hook(lambda grad: grad * batch["size"] ** -0.5)


def _scale_grads_by_tokens(module: nn.Module, params: list[nn.Parameter], tokens_factor: int = 1) -> None:
    """Weight-gradient scale tokens^-1/2 for `params` used by `module` outside a scaled GEMM (norm weights
    and biases, row-parallel biases added after the reduction): their gradient is a sum over the tokens of
    the module's last forward (times `tokens_factor`: the TP size when the module sees a sequence-parallel
    slice whose gradient is all-reduced over TP)."""
    seen = {"tokens": 1}

    def record(mod, inputs):
        seen["tokens"] = tokens_of(inputs[0]) * tokens_factor

    module.register_forward_pre_hook(record)
    for param in params:
        param.register_hook(lambda grad: grad * seen["tokens"] ** -0.5)


def _scale_unscaled_param_grads(model: nn.Module) -> None:
    """Norm weights/biases (every norm of the chunk) and row-parallel linears' biases."""
    tp = model.pstate.tp_size if model.sequence_parallel else 1
    for module in model.modules():
        if isinstance(module, (LayerNorm, RMSNorm)):
            _scale_grads_by_tokens(module, [p for p in module.parameters(recurse=False)], tp)
        elif isinstance(module, RowParallelLinear) and module.bias is not None:
            _scale_grads_by_tokens(module, [module.bias])  # the GEMM's input holds every token (before SP's scatter)


def _set_lr_scales(model: nn.Module, model_config) -> None:
    """`param.lr_scale` (the optimizer's per-tensor LR multiplier): the inverse of the factor by which the
    forward multiplies the weight, so AdamW's step moves the weight the model effectively uses by ~the same
    amount as the standard parametrisation's step at the same --lr: (fan_in fan_out)^1/4 for the layer
    linears, h^1/2 for an untied output layer, 2^1/2 for learned positions (the add's scale); 1 for the word
    embedding (also when tied: the lookup uses it unscaled), norms and biases."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module is not model.output_layer:
            module.weight.lr_scale = (module.input_size * module.output_size) ** 0.25
    if model.output_layer is not None and not getattr(model.output_layer.weight, "shared_embedding", False):
        model.output_layer.weight.lr_scale = model_config.hidden_size**0.5
    if model.embedding is not None and model.embedding.position_embeddings is not None:
        model.embedding.position_embeddings.weight.lr_scale = 2**0.5


def apply_unit_scaling(model: nn.Module, model_config, rule: ResidualRule, lr_scaling: bool = True) -> None:
    """Turn one `GPTModel` chunk into its unit-scaled version, in place. Call before `init_weights`.
    `rule` gives each residual branch its tau; `lr_scaling` sets the parameters' `lr_scale`."""
    for param in model.parameters():
        if getattr(param, "init_rule", None) == "normal":
            param.init_std = 1.0
    vocab = model_config.vocab_size
    # fc1's outputs have std (m/n)^(1/4) under the gmean rule (m = h, n = its outputs): scale for that
    sigma = (model_config.hidden_size / (model_config.ffn_hidden_size * (2 if model_config.swiglu else 1))) ** 0.25
    act_scale = activation_scale(model_config.swiglu, sigma)
    attn_scale = attention_output_scale(model_config.seq_length)
    for index, layer in model.decoder.layers.items():
        layer.residual_split, layer.residual_add = _residual_ops(int(index), rule)
        for linear, input_scale in ((layer.self_attention.linear_qkv, 1.0),
                                    (layer.self_attention.linear_proj, attn_scale),
                                    (layer.mlp.linear_fc1, 1.0), (layer.mlp.linear_fc2, act_scale)):
            link = UnitScaledGemm(linear.input_size, linear.output_size, input_scale=input_scale)
            linear.gemm = add_link(linear.gemm, link)  # around FP8, if on (in either order)
    if model.embedding is not None:
        model.embedding.word_embeddings.register_forward_hook(_embedding_grad_hook(vocab))
        if model.embedding.position_embeddings is not None:
            _add_position_scales(model.embedding)
    if model.post_process:
        model.output_gemm = UnitScaledGemm(
            model_config.hidden_size, vocab,
            output_grad_scale=lambda tokens: tokens * vocab / math.sqrt(vocab - 1), constrain=False,
        )
    _scale_unscaled_param_grads(model)
    if lr_scaling:
        _set_lr_scales(model, model_config)
