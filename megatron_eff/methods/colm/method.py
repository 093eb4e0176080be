"""CoLM as a `Method`: each iteration draws B_L candidates from the batch source, scores them with zeroth-order
scalars in a forward-only pass (`zo.py`), picks the coreset (`selection.py`) and returns this rank's
micro-batches of it (`BatchSource.select`); the trainer then trains on the coreset as on any global batch
(plain mean loss, no reweighting).

Under data parallelism the selection is global: each DP rank scores its share of the pool on the last
pipeline stage, the scalars are summed into one pool-sized vector on every rank (each position is filled by
exactly one rank), global rank 0 selects and broadcasts the positions and the sketch moments, and every DP rank
trains its contiguous slice of the same coreset: the single process' coreset for the same data. The moments
and the seed of z are the method's checkpoint state; the data position is the batch source's.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

from megatron_eff.methods.base import Method
from megatron_eff.methods.colm.selection import AdamSketch, select_coreset
from megatron_eff.methods.colm.zo import full_direction, shared_direction, value_rows, zo_forward_step
from megatron_eff.parallel.pipeline import activation_shape, get_forward_backward_func
from megatron_eff.parallel.state import communication_device


def resolve_keep_sources(specs, names: list[str], weights: list[float], keep_small: bool) -> set[int]:
    """Source indices kept whole: `specs` (indices or domain names, --colm-keep-sources), plus the sources
    whose blend weight is below the average with `keep_small` (--colm-keep-small-sources)."""
    keep = set()
    for spec in specs:
        if spec.isdigit() and int(spec) < len(names):
            keep.add(int(spec))
        elif spec in names:
            keep.add(names.index(spec))
        else:
            raise ValueError(f"--colm-keep-sources: {spec!r} is neither an index in [0, {len(names)}) nor the name "
                             f"of a --data-path domain ({', '.join(names)})")
    if keep_small:
        keep |= {k for k, w in enumerate(weights) if w < 1 / len(weights)}
    return keep


class CoLM(Method):
    """See the module docstring."""

    name = "colm"

    def __init__(self, colm_config, config, pstate):
        self.cfg, self.config, self.pstate = colm_config, config, pstate
        train = config.train
        self.coreset_size = train.resolved_global_batch_size(pstate.dp_size)
        self.large_batch_size = colm_config.resolved_large_batch_size(self.coreset_size)
        step = train.micro_batch_size * pstate.dp_size
        if self.large_batch_size % step:
            raise ValueError(f"--colm-large-batch-size {self.large_batch_size} must be a multiple of "
                             f"--micro-batch-size x data-parallel size = {step}")
        self.zo_seed = colm_config.zo_seed if colm_config.zo_seed is not None else train.seed + 1
        self.sketch = AdamSketch(colm_config.adam_beta1, colm_config.adam_beta2, colm_config.adam_eps)
        model = config.model
        self.last_layer_index = model.num_layers - 1
        self.v_shape = (model.num_query_groups, model.head_dim, model.hidden_size)
        self.selections: list[list[int]] = []  # dataset indices of each iteration's coreset (tests, bench)
        self.last: dict[str, float] = {}
        self.totals = {"iterations": 0, "features_s": 0.0, "select_s": 0.0}

    def attach(self, trainer) -> None:
        self.trainer = trainer
        source = trainer.batch_source
        dataset = source.dataset
        self.source_names = list(dataset.member_names) if source.blended else ["train"]
        weights = list(dataset.weights) if source.blended else [1.0]
        self.keep = resolve_keep_sources(self.cfg.keep_sources, self.source_names, weights,
                                         self.cfg.keep_small_sources)
        self.v_rows = None  # this rank's V rows of the last layer, where it lives (last pipeline stage)
        for chunk in trainer.model:
            if str(self.last_layer_index) in chunk.decoder.layers:
                self.v_rows = value_rows(chunk.decoder.layers[str(self.last_layer_index)])
        self._local_z: tuple[int, torch.Tensor] | None = None

    # --- one iteration --------------------------------------------------------------------------------------

    def _seed(self, iteration: int) -> int:
        return self.zo_seed + iteration if self.cfg.zo_resample else self.zo_seed

    def _local_direction(self, iteration: int) -> torch.Tensor | None:
        if self.v_rows is None:
            return None
        seed = self._seed(iteration)
        if self._local_z is None or self._local_z[0] != seed:
            self._local_z = (seed, shared_direction(seed, self.v_rows, self.pstate.tp_rank, self.pstate.tp_size))
        return self._local_z[1]

    @torch.no_grad()
    def score(self, batches: list[dict], iteration: int) -> torch.Tensor | None:
        """This rank's candidates' zeroth-order scalars [n] (last pipeline stage; None elsewhere), in eval mode."""
        trainer, pstate = self.trainer, self.pstate
        chunks = trainer.model
        for chunk in chunks:
            chunk.eval()
        schedule = get_forward_backward_func(pstate, virtual=len(chunks) > 1)
        shape = activation_shape(self.config.model.seq_length, self.config.train.micro_batch_size,
                                 self.config.model.hidden_size, pstate.tp_size, self.config.parallel.sequence_parallel)
        step = functools.partial(zo_forward_step, last_layer_index=self.last_layer_index,
                                 z=self._local_direction(iteration), eps=self.cfg.zo_eps)
        results = schedule(chunks, iter(batches), len(batches), pstate=pstate, tensor_shape=shape, forward_only=True,
                           autocast=trainer.autocast, forward_step=step)
        for chunk in chunks:
            chunk.train()
        if not pstate.is_last_stage:
            return None
        return torch.cat([r.report["zo_scalar"] for r in results])

    def _pool_scalars(self, scalars: torch.Tensor | None, positions) -> torch.Tensor:
        """Every candidate's scalar [B_L] on every rank: each is written by one rank (last stage, TP rank 0)."""
        pool = torch.zeros(self.large_batch_size, dtype=torch.float64, device=communication_device())
        if scalars is not None and self.pstate.tp_rank == 0:
            pool[torch.as_tensor(positions, device=pool.device)] = scalars.to(pool.device, torch.float64)
        if self.pstate.world_size > 1:
            dist.all_reduce(pool)
        return pool.cpu()

    def _select(self, pool: torch.Tensor, sources, iteration: int) -> tuple[list[int], dict]:
        """The coreset's pool positions, chosen on global rank 0 and broadcast with the sketch moments."""
        payload = [None]
        if self.pstate.rank == 0:
            z = None if not self.cfg.zo_resample else full_direction(self._seed(iteration), self.v_shape).flatten()
            chosen, info = select_coreset(pool, torch.as_tensor(sources), self.keep, self.coreset_size, self.sketch,
                                          iteration, z=z, zo_dim=self.cfg.zo_dim, similarity=self.cfg.similarity)
            payload = [(chosen, info, self.sketch.state_dict())]
        if self.pstate.world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        chosen, info, sketch_state = payload[0]
        if self.pstate.rank != 0:
            self.sketch.load_state_dict(sketch_state)
        return chosen, info

    def select_batch(self, iteration: int, source) -> list[dict]:
        start = time.perf_counter()
        candidates = source.draw(self.large_batch_size)
        scalars = self.score(candidates.micro_batches, iteration)
        pool = self._pool_scalars(scalars, candidates.positions)
        scored = time.perf_counter()
        chosen, info = self._select(pool, candidates.dataset_ids, iteration)
        done = time.perf_counter()
        self.selections.append(candidates.dataset_indices[chosen].tolist())
        self.last = {"colm/large_batch": float(self.large_batch_size), "colm/small_batch": float(len(chosen)),
                     "colm/kept_sources": float(len(self.keep)), "colm/kept": float(info["kept"]),
                     "colm/features_ms": 1e3 * (scored - start),
                     "colm/select_ms": 1e3 * (done - scored)}
        for k, name in enumerate(self.source_names):
            self.last[f"colm/n_{name}"] = float(info["per_source"].get(k, 0))
        self.totals["iterations"] += 1
        self.totals["features_s"] += scored - start
        self.totals["select_s"] += done - scored
        return source.select(chosen)

    # --- logging and state ----------------------------------------------------------------------------------

    def log_scalars(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"zo_seed": self.zo_seed, "sketch": self.sketch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.zo_seed = int(state["zo_seed"])
        self.sketch.load_state_dict(state["sketch"])

    def summary(self) -> str:
        n = max(self.totals["iterations"], 1)
        kept = ", ".join(self.source_names[k] for k in sorted(self.keep)) or "none"
        return (f"CoLM: {self.totals['iterations']} coresets of {self.coreset_size} from {self.large_batch_size} "
                f"candidates; kept sources: {kept}; per iteration: scoring {1e3 * self.totals['features_s'] / n:.1f} "
                f"ms, selection {1e3 * self.totals['select_s'] / n:.1f} ms")
