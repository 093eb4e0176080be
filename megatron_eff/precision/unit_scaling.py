"""Unit Scaling (Blake, Orr, Luschi 2023, arXiv 2303.11257; rules of the `unit-scaling` library v0.1).

Every weight, activation and gradient has ~unit variance at initialisation, so FP16/FP8 training needs no
loss scaling. A scaled op is y = alpha * f(x) in forward with the gradient of input i multiplied by beta_i
in backward; two primitives make any op scaled: `scale_fwd(x, a)` and `scale_bwd(x, b)`.

`apply_unit_scaling(model, ...)` transforms a built `GPTModel` chunk (before its weights are initialised):

Rules used (v0.1's unless marked *ours*):
- init: every "normal" weight (linears, embeddings, output layer) N(0, 1); biases 0, norm weights 1.
- linear X[b x m] W[n x m]^T: alpha = beta_X = (m n)^-1/4 (gmean of m^-1/2 and n^-1/2: a non-cut edge),
  beta_W = beta_bias = b^-1/2 (b = tokens of the micro-batch); global m, n under TP.
- output layer: alpha = h^-1/2, beta_X = V^-1/2, unconstrained: every gradient of the model passes through
  this edge, so a different backward scale rescales all of them alike (*ours*: keeps logits and the
  gradient at the final norm unit).
- GELU: alpha = beta = gmean(1/0.588, 1/0.675) = 1.587 for unit inputs (the paper's); SwiGLU:
  gmean(1/0.597, 1/0.606) = 1.663 from E[silu(z)^2], E[silu'(z)^2] (*ours*: v0.1 has no SwiGLU). Both are
  evaluated by quadrature at fc1's actual output std (m/n)^1/4 under the gmean rule (*ours*), and folded
  into fc2's input.
- attention: the SDPA output times sqrt(s / H_s), H_s = sum_t 1/t: uniform causal attention at init
  averages t unit values at position t, mean variance H_s / s (*ours*, "almost-scaled"); folded into
  linear_proj's input. The q.k logits are already unit (SDPA's 1/sqrt(d) with unit q, k).
- residual: x + f(x) -> sqrt(1 - tau) x + sqrt(tau) f(x), the branch's sqrt(tau) applied to its gradient
  at the split and to its value at the add (`residual_split` / `residual_add`); tau_attn = 0.01,
  tau_mlp = 0.5 (v0.1 defaults).
- word embedding: weight-gradient scale sqrt(V / tokens). Learned positions: word + position is an add,
  alpha = 2^-1/2; position-table weight-gradient scale b^-1/2 (b = sequences).
- softmax cross-entropy: the logits' gradient times tokens * V / sqrt(V - 1): the loss is reported as the
  mean and back-propagated as the sum (folded into the output GEMM).
- norms: alpha = 1; their weight-gradient scale is not applied (AdamW is invariant to a per-tensor
  gradient scale). Dropout is not rescaled (the presets train without it).

Gradient accumulation: the schedules scale each micro-batch's loss by 1/M; the trainer multiplies the
loss scale by M under unit scaling (and divides the summed gradients by M afterwards), so each
micro-batch's backward stays unit-scaled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_eff.autograd import forward_backward_function
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


def _residual_ops(taus: dict[str, float]):
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
    """word + position is an add (alpha = 2^-1/2); the position table's gradient sums over the batch b
    (weight-gradient scale b^-1/2, b read from the tokens `[b, s]` of the last forward)."""
    batch = {"size": 1}

    def add_hook(module, inputs, output):
        batch["size"] = inputs[0].shape[0]
        return scale_fwd(output, 2**-0.5)

    embedding.register_forward_hook(add_hook)
    embedding.position_embeddings.weight.register_hook(lambda grad: grad * batch["size"] ** -0.5)


def apply_unit_scaling(model: nn.Module, model_config, tau_attn: float, tau_mlp: float) -> None:
    """Turn one `GPTModel` chunk into its unit-scaled version, in place. Call before `init_weights`."""
    for param in model.parameters():
        if getattr(param, "init_rule", None) == "normal":
            param.init_std = 1.0
    vocab = model_config.vocab_size
    # fc1's outputs have std (m/n)^(1/4) under the gmean rule (m = h, n = its outputs): scale for that
    sigma = (model_config.hidden_size / (model_config.ffn_hidden_size * (2 if model_config.swiglu else 1))) ** 0.25
    act_scale = activation_scale(model_config.swiglu, sigma)
    attn_scale = attention_output_scale(model_config.seq_length)
    split, add = _residual_ops({"attention": tau_attn, "mlp": tau_mlp})
    for layer in model.decoder.layers.values():
        layer.residual_split, layer.residual_add = split, add
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
