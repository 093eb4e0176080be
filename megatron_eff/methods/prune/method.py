"""Targeted structured pruning (Sheared LLaMA, Xia et al. 2024) as a training method.

Per forward of a model chunk (a pre-hook) one gate draw per mask, shared by every token of the micro-batch
and identical on every rank: the noise is drawn for the *full* mask from a generator seeded by (seed,
iteration, global micro-batch index, mask), and each rank takes its shard, so any TP/PP/DP layout draws
what one process draws. In eval mode the gates are deterministic (`hard_concrete.deterministic_gate`).

The Lagrangian, per pruned module M with expected sparsity s_M (1 - expected kept fraction; per layer for
heads and channels, averaged over layers) and a target t_M ramped linearly from 0 over
`--prune-lagrangian-warmup` x `--train-iters`:

    term_M = mean_rows[ lambda1_M (s_M - t_M) + lambda2_M (s_M - t_M)^2 ]

enters the loss through `loss_terms`; lambda is trained by gradient ascent (its own optimizer group).
Expected counts need every shard (TP) and layer (PP): after each step the method all-reduces the detached
totals over the model-parallel group, and in the forward a chunk adds its own shards' differentiable part
(`local + (total - local.detach())`): the value is global, the gradient reaches exactly the local logits,
and no collective runs inside the pipeline schedule. Each term is counted once over chunks, stages and
TP ranks: per-layer terms are split over the chunks that hold the layers; the layer and hidden terms'
lambda (and, under sequence parallelism, the replicated logits) get their gradient on one chunk only.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from megatron_eff.methods.base import Method
from megatron_eff.methods.prune.config import MODULES, PruneConfig
from megatron_eff.methods.prune.hard_concrete import (
    INIT_MEAN,
    INIT_STD,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    deterministic_gate,
    expected_keep_count,
    keep_probability,
    sample_gate,
    uniform_noise,
)
from megatron_eff.methods.prune.masks import PruneMasks, install_embedding_hook, install_norm_hook


def lagrangian_term(sparsity: torch.Tensor, target: float, lambdas: torch.Tensor) -> torch.Tensor:
    """lambda1 (s - t) + lambda2 (s - t)^2, elementwise over `sparsity`."""
    gap = sparsity - target
    return lambdas[0] * gap + lambdas[1] * gap * gap


def expected_num_params(scores: dict[str, torch.Tensor], model) -> float:
    """Expected prunable parameters (attention and MLP weights, no embeddings, norms or biases) under the
    keep probabilities `scores` ({module: full tensor}; an absent module keeps everything)."""
    L, g, m, h = model.num_layers, model.num_query_groups, model.ffn_hidden_size, model.hidden_size
    per_group = (2 * model.num_attention_heads // g + 2) * model.head_dim  # q and o of its heads, k, v (x h)
    per_channel = 3 if model.swiglu else 2
    layer = scores.get("layer", torch.ones(L)).double()
    heads = scores["head"].double().sum(-1) if "head" in scores else torch.full((L,), float(g), dtype=torch.float64)
    channels = scores["ffn"].double().sum(-1) if "ffn" in scores else torch.full((L,), float(m), dtype=torch.float64)
    hidden = scores["hidden"].double().sum() if "hidden" in scores else torch.tensor(float(h), dtype=torch.float64)
    return float(hidden * (layer * (heads * per_group + channels * per_channel)).sum())


def num_params(model) -> int:
    """Prunable parameters of a dense shape (`expected_num_params` with every unit kept)."""
    return round(expected_num_params({}, model))


def _seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


class Prune(Method):
    name = "prune"

    def __init__(self, prune_config: PruneConfig, config, pstate):
        self.cfg, self.config, self.pstate = prune_config, config, pstate
        self.model_config = config.model
        self.targets = prune_config.targets(config.model)  # {module: (source, target)}
        self.modules = [m for m in MODULES if m in self.targets]
        self.row = {m: i for i, m in enumerate(self.modules)}
        warmup = prune_config.lagrangian_warmup * config.train.train_iters
        self.warmup_iters = max(0, round(warmup))
        self.iteration = 0
        self.chunks: list = []
        self._micro: list[int] = []
        self.expected: dict[str, torch.Tensor] = {}  # full keep-probability totals (detached), per module
        self.scores: dict[str, torch.Tensor] = {}  # full keep probabilities
        self.gates: dict[str, torch.Tensor] = {}  # full deterministic gates (eval)

    # --- building ------------------------------------------------------------------------------------------

    def transform_model(self, chunks: list) -> None:
        self.chunks = list(chunks)
        sp = self.config.parallel.sequence_parallel
        for v, chunk in enumerate(self.chunks):
            layers = [int(i) for i in chunk.decoder.layers.keys()]
            masks = PruneMasks(self.modules, layers, self.model_config, self.pstate.tp_size, shared=v == 0,
                               sequence_parallel=sp)
            chunk.add_module("prune", masks)
            self._init_logits(masks)
            for layer in chunk.decoder.layers.values():
                install_norm_hook(layer.input_layernorm, masks)
                install_norm_hook(layer.pre_mlp_layernorm, masks)
            if chunk.decoder.final_layernorm is not None:
                install_norm_hook(chunk.decoder.final_layernorm, masks)
            if chunk.embedding is not None:
                install_embedding_hook(chunk.embedding, masks)
            chunk.register_forward_pre_hook(self._make_pre_hook(v))
        self.shared = self.chunks[0].prune
        self._micro = [0] * len(self.chunks)
        self.refresh()

    @torch.no_grad()
    def _init_logits(self, masks: PruneMasks) -> None:
        """N(5, 0.01^2) from a generator per global name (the full tensor, then this rank's shard)."""
        for name, param in masks.named_parameters():
            if name == "lambdas":
                continue
            gen = torch.Generator().manual_seed(_seed_of(self.config.train.seed, "prune-init", name))
            full = torch.randn(param.full_shape, generator=gen) * INIT_STD + INIT_MEAN
            param.copy_(self._shard(full, param))

    def _shard(self, full: torch.Tensor, param) -> torch.Tensor:
        if getattr(param, "partition_dim", None) is None:
            return full
        return full.chunk(self.pstate.tp_size, dim=param.partition_dim)[self.pstate.tp_rank]

    def param_groups(self) -> list[dict]:
        ratio = self.config.optim.min_lr / self.config.optim.lr if self.config.optim.lr else 0.0
        logits = [p for chunk in self.chunks for p in chunk.prune.logit_parameters()]
        return [
            {"params": logits, "max_lr": self.cfg.mask_lr, "min_lr": self.cfg.mask_lr * ratio},
            {"params": [self.shared.lambdas], "max_lr": self.cfg.lambda_lr, "min_lr": self.cfg.lambda_lr * ratio,
             "maximize": True},
        ]

    # --- the gates -----------------------------------------------------------------------------------------

    def _full_logits(self) -> dict[str, torch.Tensor]:
        """Every mask's full logits (all layers, all TP shards), the same on every rank (collective)."""
        model, L, device = self.model_config, self.model_config.num_layers, self.shared.lambdas.device
        shapes = {"layer": (L,), "head": (L, model.num_query_groups), "ffn": (L, model.ffn_hidden_size)}
        full = {m: torch.zeros(shapes[m], device=device) for m in self.modules if m in shapes}
        for chunk in self.chunks:
            for i, layer in chunk.prune.layers.items():
                for m in ("head", "ffn"):
                    if m in full:
                        local = getattr(layer, m).detach()
                        n = local.numel()
                        full[m][int(i), self.pstate.tp_rank * n:(self.pstate.tp_rank + 1) * n] = local
                if "layer" in full and self.pstate.tp_rank == 0:
                    full["layer"][int(i)] = layer.layer.detach()[0]
        if full and self.pstate.model_parallel_group is not None and dist.get_world_size(
                self.pstate.model_parallel_group) > 1:
            flat = torch.cat([t.flatten() for t in full.values()])
            dist.all_reduce(flat, group=self.pstate.model_parallel_group)
            offset = 0
            for t in full.values():
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        if "hidden" in self.modules:
            full["hidden"] = self.shared.hidden.detach().clone()
        return full

    @torch.no_grad()
    def refresh(self) -> None:
        """Clamp the logits, then recompute the global expected counts and the deterministic gates."""
        for chunk in self.chunks:
            for p in chunk.prune.logit_parameters():
                p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        full = self._full_logits()
        self.scores = {m: keep_probability(t) for m, t in full.items()}
        self.expected = {m: s.sum(-1) for m, s in self.scores.items()}
        self.gates = {}
        for m, t in full.items():
            keep = self.targets[m][1] if self.cfg.eval_target_shape else expected_keep_count(t)
            self.gates[m] = deterministic_gate(t, keep)

    def _make_pre_hook(self, v: int):
        def hook(chunk, args, kwargs=None):
            self._set_gates(v, chunk)
        return hook

    def _noise(self, module: str, micro: int) -> torch.Tensor:
        shape = {"layer": (self.model_config.num_layers,), "head": (self.model_config.num_layers,
                 self.model_config.num_query_groups), "ffn": (self.model_config.num_layers,
                 self.model_config.ffn_hidden_size), "hidden": (self.model_config.hidden_size,)}[module]
        gen = torch.Generator().manual_seed(_seed_of(self.config.train.seed, self.iteration, micro, module))
        return uniform_noise(shape, gen)

    @staticmethod
    def _draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return sample_gate(logits, u.to(logits.device))

    def _local_rows(self, full: torch.Tensor, layer: int) -> torch.Tensor:
        row = full[layer]
        n = row.numel() // self.pstate.tp_size
        return row[self.pstate.tp_rank * n:(self.pstate.tp_rank + 1) * n]

    def _set_gates(self, v: int, chunk) -> None:
        """This forward's gates at every site of chunk `v`: a draw in training, deterministic in eval."""
        masks = chunk.prune
        if chunk.training and torch.is_grad_enabled():
            micro = self._micro[v] * self.pstate.dp_size + self.pstate.dp_rank  # global micro-batch index
            self._micro[v] += 1
            noise = {m: self._noise(m, micro) for m in self.modules}
            z_hidden = self._draw(self.shared.hidden, noise["hidden"]) if "hidden" in self.modules else None
        else:
            noise = None
            z_hidden = self.gates["hidden"].to(self.shared.lambdas.device) if "hidden" in self.modules else None
        masks.z_hidden = z_hidden
        heads_per_group = self.model_config.num_attention_heads // self.model_config.num_query_groups
        for i, layer in chunk.decoder.layers.items():
            logits, li = masks.layers[i], int(i)
            z = {}
            for m in ("layer", "head", "ffn"):
                if m not in self.modules:
                    continue
                if noise is not None:
                    u = noise[m][li:li + 1] if m == "layer" else self._local_rows(noise[m], li)
                    z[m] = self._draw(getattr(logits, m), u)
                else:
                    full = self.gates[m]
                    g = full[li:li + 1] if m == "layer" else self._local_rows(full, li)
                    z[m] = g.to(self.shared.lambdas.device)
            delta = None
            if "layer" in z:
                delta = z["layer"] if z_hidden is None else z["layer"] * z_hidden
            elif z_hidden is not None:
                delta = z_hidden
            layer.attention_delta_site.mask = delta
            layer.mlp_delta_site.mask = delta
            layer.self_attention.head_site.mask = (
                z["head"].repeat_interleave(heads_per_group) if "head" in z else None)
            layer.mlp.ffn_site.mask = z.get("ffn")

    # --- the Lagrangian ------------------------------------------------------------------------------------

    def target_sparsity(self, module: str, iteration: int) -> float:
        """t_M at `iteration` (1-based): ramped linearly from 0 over the warm-up."""
        source, target = self.targets[module]
        final = 1.0 - target / source
        if self.warmup_iters == 0:
            return final
        return final * min(1.0, (iteration - 1) / self.warmup_iters)

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        """A replicated logit's gradient from a term: on TP rank 0 only when sequence parallel sums it."""
        if self.config.parallel.sequence_parallel and self.pstate.tp_rank != 0:
            return tensor.detach()
        return tensor

    def loss_terms(self, chunk, batch: dict) -> dict[str, torch.Tensor]:
        if not (chunk.training and torch.is_grad_enabled()):
            return {}
        masks, lambdas = chunk.prune, self.shared.lambdas
        L = self.model_config.num_layers
        terms = {}
        for m in ("head", "ffn"):
            if m not in self.modules or not len(masks.layers):
                continue
            source = self.targets[m][0]
            total = 0.0
            for i, logits in masks.layers.items():
                local = keep_probability(getattr(logits, m)).sum()
                kept = local + (self.expected[m][int(i)].to(local.device) - local.detach())
                total = total + lagrangian_term(1 - kept / source, self.target_sparsity(m, self.iteration),
                                                lambdas[self.row[m]])
            terms[m] = total / L
        if "layer" in self.modules and len(masks.layers):
            local = sum(keep_probability(self._own(logits.layer)).sum() for logits in masks.layers.values())
            kept = local + (self.expected["layer"].to(local.device) - local.detach())
            lam = lambdas[self.row["layer"]] if chunk.pre_process else lambdas[self.row["layer"]].detach()
            terms["layer"] = lagrangian_term(1 - kept / L, self.target_sparsity("layer", self.iteration), lam)
        if "hidden" in self.modules and chunk.pre_process:
            kept = keep_probability(self._own(self.shared.hidden)).sum()
            terms["hidden"] = lagrangian_term(1 - kept / self.targets["hidden"][0],
                                              self.target_sparsity("hidden", self.iteration),
                                              lambdas[self.row["hidden"]])
        return terms

    # --- the loop ------------------------------------------------------------------------------------------

    def before_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self._micro = [0] * len(self.chunks)
        self.refresh()

    def after_step(self, iteration: int) -> None:
        self.refresh()  # validation after this step uses the stepped logits

    def expected_sparsity(self) -> dict[str, float]:
        return {m: 1.0 - float(self.expected[m].double().mean()) / self.targets[m][0] for m in self.modules}

    def lagrangian(self, iteration: int) -> float:
        """The Lagrangian's value at `iteration` (from the global expected counts)."""
        lambdas = self.shared.lambdas.detach().double().cpu()
        total = 0.0
        for m, s in self.expected_sparsity_rows().items():
            total += float(lagrangian_term(s, self.target_sparsity(m, iteration), lambdas[self.row[m]]).mean())
        return total

    def expected_sparsity_rows(self) -> dict[str, torch.Tensor]:
        return {m: 1 - self.expected[m].double().cpu() / self.targets[m][0] for m in self.modules}

    def log_scalars(self) -> dict[str, float]:
        out = {}
        lambdas = self.shared.lambdas.detach().cpu()
        for m, s in self.expected_sparsity().items():
            out[f"prune/{m}_sparsity"] = s
            out[f"prune/{m}_target"] = self.target_sparsity(m, max(self.iteration, 1))
            out[f"prune/{m}_lambda1"] = float(lambdas[self.row[m], 0])
            out[f"prune/{m}_lambda2"] = float(lambdas[self.row[m], 1])
        out["prune/lagrangian"] = self.lagrangian(max(self.iteration, 1))
        out["prune/expected_params"] = expected_num_params({m: s.cpu() for m, s in self.scores.items()},
                                                           self.model_config)
        out["prune/target_params"] = float(num_params(self.target_model_config()))
        return out

    def target_model_config(self):
        """The model config of the target shape (what extraction writes)."""
        from megatron_eff.methods.prune.extract import target_config

        return target_config(self.model_config, self.targets)

    def summary(self) -> str:
        parts = ", ".join(f"{m} {s:.3f} (target {1 - self.targets[m][1] / self.targets[m][0]:.3f})"
                          for m, s in self.expected_sparsity().items())
        expected = expected_num_params({m: s.cpu() for m, s in self.scores.items()}, self.model_config)
        return (f"prune: expected sparsity {parts}; expected prunable params {expected:,.0f}, target "
                f"{num_params(self.target_model_config()):,}")


__all__ = ["Prune", "expected_num_params", "lagrangian_term", "num_params"]
