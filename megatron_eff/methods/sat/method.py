"""Sparsity-Accelerated Training (SAT; Ma, Chen et al. 2024, arXiv 2406.01392): each iteration computes only
the important attention heads (GQA, `--sat-head-unit`: single query heads with K/V dense, or whole query
groups) and MLP channels of every layer, with really smaller GEMMs, and a ladder omission-rate schedule
(LORS, `schedule.py`) brings the model back to dense. README.md, section "SAT -- Sparsity-Accelerated
Training".

A training method (`methods/base.py`), built when `--sat` is given; the model does not know it is there:
- `transform_model`: hooks on every non-exempt `TransformerLayer` (a forward pre-hook that hands the layer
  this iteration's `LayerSelection` while training -- validation and generation stay dense), and, for the
  importance score, pre-hooks on its attention and MLP (running input statistics, `wanda`) or forward hooks
  on its "head" / "ffn" sites (output norms, `ema`);
- `before_iteration(it)`: the omission rates rho_h, rho_c of the ladder at it - 1 completed iterations, and per
  layer the kept units from the scores (`selection.py`): from the current weights and statistics of earlier
  iterations only, so the selection is fixed before any projection of the iteration runs (the same for every
  micro-batch, recompute and pipeline stage);
- the layer then runs `SelfAttention.forward(query_heads=...)` (or `heads=...`, groups) and
  `MLP.forward(channels=...)`: QKV's q rows of the kept heads and every group's k and v rows (or the kept
  groups' rows), fc1's (gate and up) rows of the kept channels and the matching input columns of `linear_proj`
  and fc2 are gathered (`parallel/layers.py` rows= / cols=), so the GEMMs are (1 - rho) wide, and autograd
  scatters the gradients back into the full parameters (omitted rows get zero gradient);
- `after_backward`: the running statistics of this iteration are reduced over DP (and TP under sequence
  parallel) and folded in; with `--sat-freeze-omitted` the omitted rows' weights and AdamW moments are
  copied, and `after_step` puts them back, so AdamW's momentum and weight decay do not move them;
- FLOPs: dense-equivalent vs actual per iteration (`training/flops.py`), the FLOP model's predicted step-time
  ratio, the measured step time; logged and summarised at the end.

Parallel layouts: units are chosen in equal blocks (`--sat-balance-blocks`, default the TP size), so each TP
rank keeps the same count from its own shard without communication (query heads: from its own groups; every
rank's GEMMs, and so the FLOP count, are alike and need no reduction); DP replicas hold the same weights and
DP-reduced statistics, so they choose the same units; pipeline stages own their layers. Checkpoints hold the
statistics (sharded like the units) and the FLOP counters; the selection is a function of those, the weights,
the seed and the iteration, so a resumed run selects exactly as the uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_eff.methods.base import FlopAccounting, Method
from megatron_eff.methods.sat.config import SATConfig
from megatron_eff.methods.sat.schedule import LadderSchedule
from megatron_eff.methods.sat.selection import keep_count, select_units, unit_generator, wanda_scores
from megatron_eff.model.attention import _unit_elements, query_rows
from megatron_eff.model.transformer import LayerSelection
from megatron_eff.training import flops as flops_lib

# The running statistic of a unit never computed yet: the largest float64, so it scores highest (every unit is
# tried once; sums and products of it overflow to +inf as a score) while the saved state stays finite.
NEVER = torch.finfo(torch.float64).max


@dataclass
class SATLayer:
    """One transformer layer of this rank under SAT, with its running statistics (see `selection.py`)."""

    index: int
    layer: torch.nn.Module
    input_sq: torch.Tensor  # [2, h] running mean square of the attention / MLP input features (-1: none yet)
    head_sq: torch.Tensor  # [nq/tp] running mean square of each query head's context (NEVER: never computed)
    channel_sq: torch.Tensor  # [ffn/tp] running mean square of each channel's activation (NEVER: never)
    pending_input: torch.Tensor  # [2, h + 1] sums of squares and (last column) token counts of this iteration
    pending_units: dict = field(default_factory=dict)  # kind -> [2, units] sums of squares, counts
    selection: LayerSelection | None = None
    frozen: list = field(default_factory=list)  # (param, dim, index, values, moments) held out of this step


class SAT(FlopAccounting, Method):
    name = "sat"

    def __init__(self, sat_config: SATConfig, config, pstate):
        self.cfg, self.model_config, self.pstate = sat_config, config.model, pstate
        self.seed, self.sequence_parallel = config.train.seed, config.parallel.sequence_parallel
        train_iters = config.train.train_iters
        self.heads_schedule, self.mlp_schedule = (
            LadderSchedule.from_fractions(rate, sat_config.lors_start, sat_config.lors_end, sat_config.lors_steps,
                                          train_iters)
            for rate in (sat_config.omission_rate_heads, sat_config.omission_rate_mlp))
        m = config.model
        self.tp, self.tp_rank = pstate.tp_size, pstate.tp_rank
        self.blocks = sat_config.blocks(self.tp)
        self.heads_per_group = m.num_attention_heads // m.num_query_groups
        self.query_head_unit = sat_config.omits_query_heads(m)  # the head unit: a query head (K/V dense) or a group
        heads = m.num_attention_heads if self.query_head_unit else m.num_query_groups
        self.units = {"heads": heads, "channels": m.ffn_hidden_size}  # global counts
        self.exempt = sat_config.exempt_indices(m.num_layers)
        self.tokens_per_iter = config.train.resolved_global_batch_size(pstate.dp_size) * m.seq_length
        self.layers: list[SATLayer] = []
        self.optimizer = None
        self.rates = (0.0, 0.0)  # realised (heads, mlp) omission over the whole model, this iteration
        self.reset_flops()
        self.timing = {"sparse_s": 0.0, "sparse_n": 0, "dense_s": 0.0, "dense_n": 0, "predicted": 0.0}
        self.last_step_time = 0.0
        self._started: float | None = None

    # lifecycle
    def transform_model(self, chunks: list) -> None:
        h = self.model_config.hidden_size
        for chunk in chunks:
            for key, layer in chunk.decoder.layers.items():
                index = int(key)
                if index in self.exempt:
                    continue
                device = layer.input_layernorm.weight.device
                nq_local = self.model_config.num_attention_heads // self.tp
                ffn_local = self.model_config.ffn_hidden_size // self.tp
                state = SATLayer(
                    index, layer,
                    input_sq=torch.full((2, h), -1.0, dtype=torch.float64, device=device),
                    head_sq=torch.full((nq_local,), NEVER, dtype=torch.float64, device=device),
                    channel_sq=torch.full((ffn_local,), NEVER, dtype=torch.float64, device=device),
                    pending_input=torch.zeros(2, h + 1, dtype=torch.float64, device=device),
                    pending_units={"heads": torch.zeros(2, nq_local, dtype=torch.float64, device=device),
                                   "channels": torch.zeros(2, ffn_local, dtype=torch.float64, device=device)},
                )
                self._install_hooks(state)
                self.layers.append(state)

    def attach(self, trainer) -> None:
        self.optimizer = trainer.optimizer

    def _install_hooks(self, state: SATLayer) -> None:
        layer = state.layer

        def hand_selection(module, args, kwargs):
            if module.training and state.selection is not None:
                kwargs = {**kwargs, "selection": state.selection}
            return args, kwargs

        layer.register_forward_pre_hook(hand_selection, with_kwargs=True)
        if self.cfg.importance == "wanda":
            for slot, module in enumerate((layer.self_attention, layer.mlp)):
                module.register_forward_pre_hook(self._input_hook(state, slot))
        elif self.cfg.importance == "ema":
            layer.self_attention.head_site.register_forward_hook(self._unit_hook(state, "heads"))
            layer.mlp.ffn_site.register_forward_hook(self._unit_hook(state, "channels"))

    @staticmethod
    def _input_hook(state: SATLayer, slot: int):
        """Accumulates the input's per-feature sum of squares and token count (training forwards only; an
        activation recompute adds both again, which leaves their ratio unchanged). Summed in the input's dtype
        (a float64 copy of the activations cost ~8x the sum), accumulated in float64."""
        def hook(module, args):
            if module.training and torch.is_grad_enabled():
                x = args[0].detach()  # [s, b, h] ([s/tp, b, h] with sequence parallel)
                state.pending_input[slot, :-1] += x.square().sum(dim=(0, 1))
                state.pending_input[slot, -1] += x.shape[0] * x.shape[1]
        return hook

    @staticmethod
    def _unit_hook(state: SATLayer, kind: str):
        """Accumulates each computed unit's output sum of squares and token count."""
        def hook(site, args, out):
            if not (site.training and torch.is_grad_enabled()):
                return
            x, index = args[0].detach(), args[1] if len(args) > 1 else None
            dims = (0, 1, 3) if kind == "heads" else (0, 1)  # heads: [s, b, heads, d]; channels: [s, b, ffn]
            sums = x.square().sum(dim=dims).double() / (x.shape[3] if kind == "heads" else 1)
            pending = state.pending_units[kind]
            if index is None:
                pending[0] += sums
                pending[1] += x.shape[0] * x.shape[1]
            else:
                pending[0].index_add_(0, index, sums)
                pending[1].index_add_(0, index, torch.full_like(sums, x.shape[0] * x.shape[1]))
        return hook

    # the schedule and the selection
    def omission_rates(self, iteration: int) -> tuple[float, float]:
        """The ladder's (rho_h, rho_c) for iteration `iteration` (1-based)."""
        return self.heads_schedule(iteration - 1), self.mlp_schedule(iteration - 1)

    def kept_units(self, kind: str, rate: float) -> int:
        """Units of `kind` a non-exempt layer keeps over the whole model (all TP shards) at `rate`."""
        return self.blocks * keep_count(self.units[kind] // self.blocks, rate) if rate > 0 else self.units[kind]

    def before_iteration(self, iteration: int) -> None:
        rate_heads, rate_mlp = self.omission_rates(iteration)
        for state in self.layers:
            heads = None if rate_heads == 0 else self._select(state, "heads", rate_heads, iteration)
            channels = None if rate_mlp == 0 else self._select(state, "channels", rate_mlp, iteration)
            if heads is None and channels is None:
                state.selection = None
            elif self.query_head_unit:
                state.selection = LayerSelection(query_heads=heads, channels=channels)
            else:
                state.selection = LayerSelection(heads=heads, channels=channels)
        self._account_flops(rate_heads, rate_mlp)
        self._started = time.perf_counter()

    @torch.no_grad()
    def _select(self, state: SATLayer, kind: str, rate: float, iteration: int) -> torch.Tensor:
        blocks_local = self.blocks // self.tp
        per_block = self.units[kind] // self.blocks
        first_block = self.tp_rank * blocks_local

        def generator(j: int, purpose: str = "select") -> torch.Generator:
            return unit_generator(self.seed, iteration, state.index, f"{kind}:{purpose}", first_block + j)

        scores = self._scores(state, kind, blocks_local, per_block, generator)
        return select_units(scores, blocks_local, keep_count(per_block, rate), self.cfg.selection, generator)

    def _scores(self, state: SATLayer, kind: str, blocks_local: int, per_block: int, generator) -> torch.Tensor:
        importance = self.cfg.importance
        if importance == "random":
            return torch.cat([torch.rand(per_block, generator=generator(j, "score"), dtype=torch.float64)
                              for j in range(blocks_local)]).to(state.input_sq.device)
        if importance == "ema":
            if kind == "heads" and not self.query_head_unit:  # a group's score: the sum over its query heads
                return state.head_sq.view(-1, self.heads_per_group).sum(dim=1)
            return (state.head_sq if kind == "heads" else state.channel_sq).clone()
        slot = 0 if kind == "heads" else 1
        input_sq = state.input_sq[slot]  # -1 before any statistics: then unit RMS (magnitude)
        rms = input_sq.sqrt() if importance == "wanda" else torch.ones_like(input_sq)
        row_scores = wanda_scores(self._column_weight(state, kind), torch.where(input_sq < 0, 1.0, rms))
        if kind == "channels":  # [2, ffn/tp] (SwiGLU: gate, up) or [ffn/tp]
            return row_scores.view(-1, row_scores.shape[-1]).sum(dim=0)
        row_scores = row_scores.view(-1, self.heads_per_group + 2, self.model_config.head_dim)  # [g/tp, hpg+2, d]
        if self.query_head_unit:  # a query head: its q rows
            return row_scores[:, :self.heads_per_group].sum(dim=2).flatten()
        return row_scores.sum(dim=(1, 2))  # a group: its q, k and v rows

    @staticmethod
    def _column_weight(state: SATLayer, kind: str) -> torch.Tensor:
        if kind == "heads":
            return state.layer.self_attention.linear_qkv.weight  # [(nq + 2g) d / tp, h]
        return state.layer.mlp.linear_fc1.weight  # [2, ffn/tp, h] (SwiGLU) or [ffn/tp, h]

    def global_selections(self) -> dict[int, tuple[list[int], list[int]]]:
        """{layer: (kept head units, kept channels)} of this rank's shard as global indices (all: dense); head
        units are query heads or query groups (`--sat-head-unit`)."""
        out = {}
        for state in self.layers:
            kept = []
            for kind in ("heads", "channels"):
                local = None
                if state.selection is not None:
                    local = getattr(state.selection, "query_heads" if kind == "heads" and self.query_head_unit
                                    else kind)
                per_rank = self.units[kind] // self.tp
                local = torch.arange(per_rank) if local is None else local.cpu()
                kept.append((local + self.tp_rank * per_rank).tolist())
            out[state.index] = tuple(kept)
        return out

    # statistics
    @torch.no_grad()
    def _fold_statistics(self) -> None:
        """This iteration's sums, reduced over DP (inputs also over TP under sequence parallel), into the
        running averages; then cleared. Elementwise on the device (no host synchronisation)."""
        if not self.layers:
            return
        pending = torch.stack([s.pending_input for s in self.layers])
        self._all_reduce(pending, with_tp=self.sequence_parallel)
        for state, sums in zip(self.layers, pending):  # [2, h + 1]: sums of squares, token count
            _fold(state.input_sq, sums[:, :-1], sums[:, -1:], state.input_sq < 0, self.cfg.ema_decay)
            state.pending_input.zero_()
        for kind in ("heads", "channels"):
            pending = torch.stack([s.pending_units[kind] for s in self.layers])
            self._all_reduce(pending, with_tp=False)
            for state, (sums, counts) in zip(self.layers, pending):
                score = state.head_sq if kind == "heads" else state.channel_sq
                _fold(score, sums, counts, score == NEVER, self.cfg.ema_decay)
                state.pending_units[kind].zero_()

    def _all_reduce(self, tensor: torch.Tensor, with_tp: bool) -> None:
        for group, size in ((self.pstate.dp_group, self.pstate.dp_size),
                            (self.pstate.tp_group if with_tp else None, self.tp)):
            if group is not None and size > 1:
                dist.all_reduce(tensor, group=group)

    # freezing omitted rows
    def omitted_rows(self, state: SATLayer) -> list[tuple[torch.nn.Parameter, int, torch.Tensor]]:
        """(parameter, dim, indices along dim) of every row / column the layer omits this iteration."""
        out = []
        attention, mlp = state.layer.self_attention, state.layer.mlp
        heads, channels = state.selection.heads, state.selection.channels
        query_heads = state.selection.query_heads
        if query_heads is not None:  # their q rows and linear_proj's columns; K/V stay
            omitted = _complement(query_heads, self.units["heads"] // self.tp)
            qkv, d = attention.linear_qkv, self.model_config.head_dim
            rows = query_rows(omitted, self.heads_per_group, d)
            out += [(qkv.weight, 0, rows)] + ([(qkv.bias, 0, rows)] if qkv.bias is not None else [])
            out.append((attention.linear_proj.weight, 1, _unit_elements(omitted, d)))
        if heads is not None:
            num_groups = self.units["heads"] // self.tp
            groups = _complement(heads, num_groups)  # omitted query groups of this rank
            qkv = attention.linear_qkv
            rows = _unit_elements(groups, qkv.weight.shape[0] // num_groups)  # their q, k, v rows
            out += [(qkv.weight, 0, rows)] + ([(qkv.bias, 0, rows)] if qkv.bias is not None else [])
            cols = _unit_elements(groups, self.heads_per_group * self.model_config.head_dim)  # their q heads
            out.append((attention.linear_proj.weight, 1, cols))
        if channels is not None:
            omitted = _complement(channels, self.units["channels"] // self.tp)
            fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
            fused = fc1.weight.dim() == 3  # SwiGLU [2, ffn/tp, h]: gate and up rows of the channel
            out.append((fc1.weight, 1 if fused else 0, omitted))
            if fc1.bias is not None:
                out.append((fc1.bias, 1 if fused else 0, omitted))
            out.append((fc2.weight, 1, omitted))
        return out

    @torch.no_grad()
    def after_backward(self, iteration: int) -> None:
        self._fold_statistics()
        if not self.cfg.freeze_omitted:
            return
        for state in self.layers:
            state.frozen = []
            if state.selection is None:
                continue
            for param, dim, index in self.omitted_rows(state):
                moments = self.optimizer.state_rows(param, dim, index) if self.optimizer is not None else {}
                state.frozen.append((param, dim, index, param.detach().index_select(dim, index), moments))

    @torch.no_grad()
    def after_step(self, iteration: int) -> None:
        for state in self.layers:
            for param, dim, index, values, moments in state.frozen:
                param.index_copy_(dim, index, values)
                if self.optimizer is not None:
                    self.optimizer.restore_state_rows(param, dim, index, moments)
            state.frozen = []
        if self._started is not None:
            self.last_step_time = time.perf_counter() - self._started
            sparse = self.last_flops[1] < self.last_flops[0]
            key = "sparse" if sparse else "dense"
            self.timing[f"{key}_s"] += self.last_step_time
            self.timing[f"{key}_n"] += 1
            if sparse:
                self.timing["predicted"] += self.last_flops[0] / self.last_flops[1]
            self._started = None

    # accounting and reporting
    def _account_flops(self, rate_heads: float, rate_mlp: float) -> None:
        """Dense-equivalent and actual training FLOPs of the iteration (the whole model, every rank alike)."""
        m, tokens = self.model_config, self.tokens_per_iter
        head_density = self.kept_units("heads", rate_heads) / self.units["heads"]
        channel_density = self.kept_units("channels", rate_mlp) / self.units["channels"]
        qkv_density = head_density  # kv-group: a group's q, k and v rows go together
        if self.query_head_unit:  # only q rows go: (kept q heads + 2 g) / (nq + 2 g) of QKV
            kv_heads = 2 * m.num_query_groups
            qkv_density = (head_density * m.num_attention_heads + kv_heads) / (m.num_attention_heads + kv_heads)
        densities, attention = {}, {}
        for i in range(m.num_layers):
            if i in self.exempt:
                continue
            prefix = f"decoder.layers.{i}"
            densities[f"{prefix}.self_attention.linear_qkv"] = qkv_density
            densities[f"{prefix}.self_attention.linear_proj"] = head_density
            densities[f"{prefix}.mlp.linear_fc1"] = channel_density
            densities[f"{prefix}.mlp.linear_fc2"] = channel_density
            attention[i] = head_density
        dense = flops_lib.model_flops_per_iteration(m, tokens, m.seq_length)
        actual = flops_lib.sparse_training_flops(m, tokens, m.seq_length, densities, attention)
        self.add_flops(dense, actual)
        share = (m.num_layers - len(self.exempt)) / m.num_layers
        self.rates = (share * (1 - head_density), share * (1 - channel_density))

    def log_scalars(self) -> dict[str, float]:
        return {
            "sat/omission_heads": self.rates[0],
            "sat/omission_mlp": self.rates[1],
            "sat/predicted_speedup": self.last_flops[0] / self.last_flops[1] if self.last_flops[1] else 1.0,
            "sat/step_time": self.last_step_time,
            **self.flop_scalars(),
        }

    def checkpoint_tensors(self):
        out = []
        for s in self.layers:
            out += [
                (f"layers.{s.index}.input_sq", s.input_sq, SimpleNamespace(partition_dim=None)),  # same on TP
                (f"layers.{s.index}.head_sq", s.head_sq, _sharded_like(s.head_sq, self.tp)),
                (f"layers.{s.index}.channel_sq", s.channel_sq, _sharded_like(s.channel_sq, self.tp)),
            ]
        return out

    def state_dict(self) -> dict:
        return {**self.flop_state(), "timing": dict(self.timing)}

    def load_state_dict(self, state: dict) -> None:
        self.load_flop_state(state)
        self.timing.update(state.get("timing", {}))

    def summary(self) -> str:
        line = f"SAT: {self.flop_summary()}"
        t = self.timing
        if t["sparse_n"]:
            line += f"; mean step time with omission {t['sparse_s'] / t['sparse_n']:.4g} s ({t['sparse_n']} its)"
        if t["dense_n"]:
            line += f", dense {t['dense_s'] / t['dense_n']:.4g} s ({t['dense_n']} its)"
        if t["sparse_n"] and t["dense_n"]:
            measured = (t["dense_s"] / t["dense_n"]) / (t["sparse_s"] / t["sparse_n"])
            line += (f"; measured speed-up {measured:.2f}x, FLOP model {t['predicted'] / t['sparse_n']:.2f}x "
                     f"(dense steps at the end of the ladder are later in training: compare with bench/sat_speed.py)")
        return line


def _fold(running: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, fresh: torch.Tensor,
          decay: float) -> None:
    """running <- sums / counts where `fresh` (no average yet), else the EMA decay * running + (1 - decay) *
    sums / counts; unchanged where counts is 0 (broadcast against `running`)."""
    mean_sq = sums / counts.clamp_min(1)
    folded = torch.where(fresh, mean_sq, decay * running + (1 - decay) * mean_sq)
    running.copy_(torch.where(counts > 0, folded, running))


def _complement(kept: torch.Tensor, num: int) -> torch.Tensor:
    """The indices in [0, num) not in `kept`."""
    omitted = torch.ones(num, dtype=torch.bool, device=kept.device)
    omitted[kept] = False
    return omitted.nonzero().squeeze(1)


def _sharded_like(tensor: torch.Tensor, tp: int) -> SimpleNamespace:
    """What the checkpoint needs to know of a tensor split along dim 0 over TP (`partition_dim`, `full_shape`)."""
    return SimpleNamespace(partition_dim=0, full_shape=(tensor.shape[0] * tp,))
