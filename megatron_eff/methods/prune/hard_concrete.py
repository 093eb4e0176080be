"""Hard-concrete gates (Louizos et al. 2018) as Sheared LLaMA parameterises them (`l0_module.py` of
princeton-nlp/LLM-Shearing): one logit log(alpha) per prunable unit.

    train:          u ~ U(eps, 1 - eps),  s = sigmoid((log u - log(1 - u) + log alpha) / beta),
                    z = clamp(s (zeta - gamma) + gamma, 0, 1)
    expected keep:  P(z > 0) = 1 - sigmoid(beta log(-gamma / zeta) - log alpha)     (clamped to [eps, 1 - eps])
    deterministic:  soft = sigmoid(0.8 log alpha / beta), the smallest (n - keep) of a row set to 0

log alpha starts at N(5, 0.01^2) and is clamped to [ln 0.01, ln 100] before every use.
"""

from __future__ import annotations

import math

import torch

BETA = 2.0 / 3.0  # temperature
GAMMA, ZETA = -0.1, 1.1  # stretch interval (gamma < 0 < 1 < zeta)
EPS = 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
INIT_MEAN, INIT_STD = 5.0, 1e-2
SOFT_SLOPE = 0.8  # the authors' deterministic-mask slope (after asappresearch/flop)


def sample_gate(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A training draw z in [0, 1] from uniform noise `u` (shaped like `log_alpha`, in (0, 1))."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def uniform_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """u ~ U(eps, 1 - eps) from `generator` (CPU, float32)."""
    return torch.rand(shape, generator=generator) * (1 - 2 * EPS) + EPS


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the expected keep score of each unit."""
    return (1 - torch.sigmoid(BETA * math.log(-GAMMA / ZETA) - log_alpha)).clamp(EPS, 1 - EPS)


def soft_value(log_alpha: torch.Tensor) -> torch.Tensor:
    """The deterministic gate value of a kept unit."""
    return torch.sigmoid(SOFT_SLOPE * log_alpha / BETA)


def deterministic_gate(log_alpha: torch.Tensor, keep: int | torch.Tensor) -> torch.Tensor:
    """Soft values with all but the `keep` largest of each row (last dim) set to 0; ties keep the lower index.
    `keep`: one count for every row, or a tensor of counts per row."""
    soft = soft_value(log_alpha)
    order = torch.sort(soft, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(soft.shape[-1], device=soft.device).expand_as(order).contiguous())
    keep = torch.as_tensor(keep, device=soft.device)
    if keep.ndim:
        keep = keep.unsqueeze(-1)
    return torch.where(rank < keep, soft, torch.zeros_like(soft))


def expected_keep_count(log_alpha: torch.Tensor) -> torch.Tensor:
    """n - round(sum of drop probabilities) per row: the count deterministic gates keep during pruning."""
    return log_alpha.shape[-1] - (1 - keep_probability(log_alpha)).sum(-1).round().long()
