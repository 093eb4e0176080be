"""Gradient synchronisation: contiguous FP32 grad buckets, (overlapped) data-parallel reduction, and the
distributed optimizer (ZeRO-1) that owns one shard of every bucket.

    grad_sync = GradSync(params, pstate, bucket_size=..., overlap=..., shard=...)
    each iteration:  grad_sync.start(num_micro_batches)   # zero the buffer, attach `.grad` views, arm hooks
                     ... any schedule runs forward/backward over the micro-batches ...
                     grad_sync.finish()                   # wait for / run every reduction

Bucket layout: every trainable parameter's `.grad` is a view into one flat buffer in the parameters' dtype
(FP32: they are the master weights). Parameters are laid out in *reverse* registration order (roughly the
order backward produces them) and cut into buckets of at least `bucket_size` elements (a parameter is never
split), each padded to a multiple of the data-parallel size. Parameters whose gradient also needs a
model-parallel reduction first (sequence-parallel norm weights and row-parallel biases over TP, the tied
embedding copies over the first/last pipeline stage, `pipeline_replicated` parameters over every stage)
go into one last, *deferred* bucket reduced in `finish()` after those reductions.

Overlap: a post-accumulate-grad hook counts how many micro-batches each parameter has seen; when every
parameter of a bucket has its final gradient of the iteration (the `num_micro_batches`-th backward), the
bucket's data-parallel reduction is launched asynchronously while backward goes on. Earlier micro-batches
never communicate, and the schedule needs no flag to say which micro-batch is the last: the count does it
(1F1B and interleaved schedules included). Without overlap, `finish()` reduces all buckets.

Distributed optimizer (`shard=True`): parameters also live in one flat FP32 buffer with the same layout.
Data-parallel rank r owns the r-th 1/dp slice of every bucket: gradients are reduce-scattered (averaged)
into the owned slices, `DistributedOptimizer` runs AdamW on views of the owned slices only (its moments
are 1/dp of the model), then every bucket's parameters are all-gathered back.

Overlapped parameter gather (`--overlap-param-gather`): the all-gathers after the step are launched but
not waited for; a forward pre-hook on each module waits for the buckets of that module's own parameters,
so the gathers overlap the next forward. A parameter read outside its module's forward (the logits layer's
weight, read by the model itself) is caught by a pre-hook on the model chunk: the first forward of a chunk
waits for all its buckets and records which modules ran; afterwards the chunk waits up front only for the
buckets of modules that did not run. Code that reads or writes parameters outside a forward (method hooks
after the step, checkpoints, the next step) calls `finish_param_gather()` first; it is idempotent.

FP8 parameter gather (`fp8_params`, `--fp8-param-gather`): those parameters (the FP8 linears' weights) go into
buckets of their own, first in the layout, and get a one-byte model copy in `fp8_buffer` (uint8, the same
offsets). After a sharded step `before_param_gather` (set by `precision/fp8_params.py`) casts each rank's owned
slices into it, and the all-gather of those buckets moves the uint8 buffer instead of the FP32 one: their FP32
values outside the owned slice are not updated (the model computes with the FP8 copy) until
`gather_fp32_masters()`. `param_gather_bytes` says what the last all-gather moved, per dtype.

Every step is a no-op when its group has one rank, so a single-process run pays nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_eff.parallel.state import ParallelState, communication_device, group_size

DEFAULT_BUCKET_SIZE = 40_000_000  # elements, as Megatron-LM's DDP default

# torch >= 2.10 renamed the flat-tensor collectives; keep working with both names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_reduce_flat(tensors: list[torch.Tensor], group, average: bool) -> None:
    """One collective for a list of tensors: flatten, reduce, copy back."""
    if not tensors or group_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    if average:
        flat.div_(group_size(group))
    for tensor, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(synced)


def _needs_tp_reduce(param, pstate: ParallelState) -> bool:
    return pstate.tp_size > 1 and getattr(param, "sequence_parallel", False)


def _needs_embedding_reduce(param, pstate: ParallelState) -> bool:
    return pstate.pp_size > 1 and getattr(param, "shared_embedding", False)


def _needs_pipeline_reduce(param, pstate: ParallelState) -> bool:
    """A parameter every pipeline stage holds and uses (`pipeline_replicated`, e.g. pruning's hidden mask):
    its gradient is the sum of every stage's part."""
    return pstate.pp_size > 1 and getattr(param, "pipeline_replicated", False)


@torch.no_grad()
def finalize_gradients(params: list[torch.nn.Parameter], pstate: ParallelState) -> None:
    """Make every rank's `.grad` the gradient of the global-batch mean loss for its parameter shard
    (the unbucketed path, for callers that manage `.grad` themselves)."""
    grads = [p.grad for p in params if p.grad is not None]
    # Sequence-parallel norm weights (and row-parallel biases) saw only s/tp tokens on each TP rank.
    sp_grads = [p.grad for p in params if p.grad is not None and getattr(p, "sequence_parallel", False)]
    _all_reduce_flat(sp_grads, pstate.tp_group, average=False)
    # The tied embedding and its copy on the last stage must receive the same, summed update.
    tied = [p.grad for p in params if p.grad is not None and getattr(p, "shared_embedding", False)]
    if pstate.pp_size > 1:
        _all_reduce_flat(tied, pstate.embedding_group, average=False)
    replicated = [p.grad for p in params if p.grad is not None and _needs_pipeline_reduce(p, pstate)]
    _all_reduce_flat(replicated, pstate.pp_group, average=False)
    _all_reduce_flat(grads, pstate.grad_group, average=True)  # DP (x CP: the same weights, other tokens)


@dataclass
class Bucket:
    """A contiguous range `[start, end)` of the flat buffers (end padded to a multiple of dp)."""

    params: list[torch.nn.Parameter]
    start: int
    end: int
    deferred: bool = False  # reduced in finish(), after its model-parallel reductions
    waiting: int = 0  # parameters whose final gradient of the iteration is not there yet
    work: list = field(default_factory=list)  # (handle, scratch) of the in-flight reduction
    param_gather: tuple | None = None  # (handle, shard) of the in-flight parameter all-gather
    fp8: bool = False  # its parameters' model copy is FP8: gathered as uint8 from `GradSync.fp8_buffer`

    @property
    def numel(self) -> int:
        return self.end - self.start


def _plan_buckets(params, pstate: ParallelState, bucket_size: int,
                  fp8_params=frozenset()) -> tuple[list[Bucket], dict, int]:
    """Buckets over `params` in reverse order, those of `fp8_params` first and apart, deferred ones last;
    returns (buckets, offsets, total)."""
    deferred = [p for p in params if _needs_tp_reduce(p, pstate) or _needs_embedding_reduce(p, pstate)
                or _needs_pipeline_reduce(p, pstate)]
    deferred_ids = {id(p) for p in deferred}
    regular = [p for p in reversed(params) if id(p) not in deferred_ids]
    buckets, offsets, offset = [], {}, 0

    def close(members: list, is_deferred: bool, fp8: bool = False) -> None:
        nonlocal offset
        if not members:
            return
        start = offset
        for p in members:
            offsets[p] = offset
            offset += p.numel()
        offset = start + -(-(offset - start) // pstate.grad_size) * pstate.grad_size  # pad to a multiple of dp
        buckets.append(Bucket(list(members), start, offset, is_deferred, fp8=fp8))

    fp8_ids = {id(p) for p in fp8_params}
    for fp8 in (True, False):
        members, filled = [], 0
        for p in regular:
            if (id(p) in fp8_ids) != fp8:
                continue
            members.append(p)
            filled += p.numel()
            if filled >= bucket_size:
                close(members, False, fp8)
                members, filled = [], 0
        close(members, False, fp8)
    close(list(reversed(deferred)), True)
    return buckets, offsets, offset


class GradSync:
    """Bucketed FP32 gradient buffer with (optionally overlapped) data-parallel reduction; see the module
    docstring. After `finish()`, every parameter's `.grad` is the gradient of the global-batch mean loss
    (with `shard=True`: only the owned slices of the grad buffer are, see `owned_range`)."""

    def __init__(self, params, pstate: ParallelState, *, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 overlap: bool = False, shard: bool = False, overlap_param_gather: bool = False,
                 reduce_dtype: torch.dtype | None = None, fp8_params=()):
        self.params = [p for p in params if p.requires_grad]
        # Reduced (and, sharded, owned) over data x context parallel: CP ranks hold the same weights.
        self.pstate, self.dp_group, self.dp_size = pstate, pstate.grad_group, pstate.grad_size
        self.overlap, self.shard = overlap and self.dp_size > 1, shard
        self.overlap_param_gather = overlap_param_gather and shard and self.dp_size > 1
        self.buckets, self.offsets, total = _plan_buckets(self.params, pstate, bucket_size, fp8_params)
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        device, dtype = self.params[0].device, self.params[0].dtype  # FP32 master weights: FP32 main grads
        self.grad_buffer = torch.zeros(total, dtype=dtype, device=device)
        # --grad-reduce-in-bf16: the data-parallel reduction travels in this dtype (half the bytes); the
        # buffer itself stays FP32, so accumulation over micro-batches keeps full precision
        self.reduce_dtype = reduce_dtype or dtype
        self.grad_views = {p: self._view(self.grad_buffer, p) for p in self.params}
        self.param_buffer = None
        if shard:  # parameters become views into one flat buffer, gathered after each step
            self.param_buffer = torch.zeros(total, dtype=dtype, device=device)
            for p in self.params:
                view = self._view(self.param_buffer, p)
                view.copy_(p.detach())
                p.data = view
        self.fp8_buffer = None  # the FP8 parameters' one-byte model copies (sharded, with `fp8_params` only)
        if shard and any(b.fp8 for b in self.buckets):
            self.fp8_buffer = torch.zeros(max(b.end for b in self.buckets if b.fp8), dtype=torch.uint8,
                                          device=device)
        self.before_param_gather = None  # called after a sharded step, before the all-gather (FP8 casts)
        self.param_gather_bytes: dict[str, int] = {}
        self._expected, self._seen, self._armed = 0, {}, False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _view(self, buffer: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
        start = self.offsets[p]
        return buffer[start:start + p.numel()].view_as(p)

    def fp8_view(self, p: torch.nn.Parameter) -> torch.Tensor:
        """`p`'s one-byte model copy in `fp8_buffer` (uint8, shaped like `p`)."""
        return self._view(self.fp8_buffer, p)

    def owned_range(self, bucket: Bucket) -> tuple[int, int]:
        """The `[lo, hi)` slice of a bucket this data-parallel rank owns (all of it without sharding)."""
        if not self.shard:
            return bucket.start, bucket.end
        size = bucket.numel // self.dp_size
        lo = bucket.start + self.pstate.grad_rank * size
        return lo, lo + size

    def start(self, num_micro_batches: int) -> None:
        """Zero the gradients and arm the hooks for an iteration of `num_micro_batches` backward passes."""
        self.grad_buffer.zero_()
        for p in self.params:
            p.grad = self.grad_views[p]
        for bucket in self.buckets:
            bucket.waiting, bucket.work = len(bucket.params), []
        self._expected, self._seen, self._armed = num_micro_batches, dict.fromkeys(self.params, 0), True

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        view = self.grad_views[param]
        if param.grad is not view:  # autograd replaced `.grad` instead of accumulating into the buffer
            view.copy_(param.grad)
            param.grad = view
        self._seen[param] += 1
        if self._seen[param] != self._expected:
            return
        bucket = self.bucket_of[param]
        bucket.waiting -= 1
        if bucket.waiting == 0 and self.overlap and not bucket.deferred:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if self.dp_size == 1 or bucket.work:
            bucket.work = bucket.work or [(None, None, None)]
            return
        data = self.grad_buffer[bucket.start:bucket.end]
        cast = self.reduce_dtype != data.dtype
        if cast:
            data = data.to(self.reduce_dtype)  # kept alive in `work` until the reduction completes
        if self.shard:
            scratch = torch.empty(bucket.numel // self.dp_size, dtype=data.dtype, device=data.device)
            handle = _reduce_scatter_flat(scratch, data, group=self.dp_group, async_op=True)
        else:
            handle = dist.all_reduce(data, group=self.dp_group, async_op=True)
            scratch = data if cast else None  # reduced in place, or in a cast copy that `finish` copies back
        bucket.work = [(handle, scratch, data)]

    @torch.no_grad()
    def finish(self) -> None:
        """Run the reductions not yet launched, wait for all; grads are then the global-batch mean's."""
        self._armed = False
        for bucket in self.buckets:
            if bucket.deferred:
                self._model_parallel_reductions(bucket)
            self._launch(bucket)
        for bucket in self.buckets:
            (handle, scratch, _sent), bucket.work = bucket.work[0], []  # no finished Work outlives its wait
            if handle is None:
                continue
            handle.wait()
            lo, hi = self.owned_range(bucket)
            owned = self.grad_buffer[lo:hi]
            if scratch is not None:
                owned.copy_(scratch)
            owned.div_(self.dp_size)

    def _model_parallel_reductions(self, bucket: Bucket) -> None:
        """Sum the partial grads of sequence-parallel params over TP, of tied embeddings over the first and
        last stage, and of pipeline-replicated params over every stage."""
        sp = [p.grad for p in bucket.params if _needs_tp_reduce(p, self.pstate)]
        _all_reduce_flat(sp, self.pstate.tp_group, average=False)
        tied = [p.grad for p in bucket.params if _needs_embedding_reduce(p, self.pstate)]
        _all_reduce_flat(tied, self.pstate.embedding_group, average=False)
        replicated = [p.grad for p in bucket.params if _needs_pipeline_reduce(p, self.pstate)]
        _all_reduce_flat(replicated, self.pstate.pp_group, average=False)

    @torch.no_grad()
    def all_gather_params(self) -> None:
        """After a sharded step: every rank gets every bucket's updated parameters. With
        `overlap_param_gather` the all-gathers are only launched (in the order forward needs them). FP8
        buckets gather their uint8 copies (cast by `before_param_gather`), the others FP32."""
        if not self.shard:
            return
        if self.before_param_gather is not None:
            self.before_param_gather()
        if self.dp_size == 1:
            return
        self.param_gather_bytes = {}
        for bucket in reversed(self.buckets):  # the deferred bucket (embeddings, norms) and the first layers first
            buffer = self.fp8_buffer if bucket.fp8 else self.param_buffer
            lo, hi = self.owned_range(bucket)
            shard = buffer[lo:hi].clone()
            out = buffer[bucket.start:bucket.end]
            bucket.param_gather = (_all_gather_flat(out, shard, group=self.dp_group, async_op=True), shard)
            key = str(out.dtype).removeprefix("torch.")
            self.param_gather_bytes[key] = self.param_gather_bytes.get(key, 0) + out.numel() * out.element_size()
        if not self.overlap_param_gather:
            self.finish_param_gather()

    @torch.no_grad()
    def gather_fp32_masters(self) -> None:
        """All-gather the FP32 values of the FP8 buckets, whose step-time all-gather moves only their FP8 copies
        (collective over DP): for checkpoints, and whoever reads the parameters after the run."""
        self.finish_param_gather()
        if not self.shard or self.dp_size == 1:
            return
        for bucket in self.buckets:
            if bucket.fp8:
                lo, hi = self.owned_range(bucket)
                shard = self.param_buffer[lo:hi].clone()
                _all_gather_flat(self.param_buffer[bucket.start:bucket.end], shard, group=self.dp_group)

    def finish_param_gather(self, buckets=None) -> None:
        """Wait for the pending parameter all-gathers of `buckets` (default: all); a no-op when none is."""
        for bucket in self.buckets if buckets is None else buckets:
            if bucket.param_gather is not None:
                bucket.param_gather[0].wait()
                bucket.param_gather = None

    def param_gather_pending(self) -> bool:
        return any(bucket.param_gather is not None for bucket in self.buckets)

    def install_param_gather_hooks(self, chunks) -> None:
        """Forward pre-hooks on every module of `chunks` (this rank's model chunks) that holds parameters:
        wait for its buckets' all-gathers just before it runs (see the module docstring)."""
        if not self.overlap_param_gather:
            return
        for chunk in chunks:
            _ChunkParamGather(self, chunk)

    @torch.no_grad()
    def all_gather_grads(self) -> None:
        """After a sharded `finish()`: every rank gets every bucket's reduced gradient (only the owned slices
        are reduced otherwise). For methods that need the whole dense gradient now and then (MST growing)."""
        if not self.shard or self.dp_size == 1:
            return
        handles = []
        for bucket in self.buckets:
            lo, hi = self.owned_range(bucket)
            shard = self.grad_buffer[lo:hi].clone()
            out = self.grad_buffer[bucket.start:bucket.end]
            handles.append(_all_gather_flat(out, shard, group=self.dp_group, async_op=True))
        for handle in handles:
            handle.wait()

    def shard_pieces(self):
        """Yield (param, flat_lo, flat_hi) for each piece of a parameter inside this rank's owned slices."""
        for bucket in self.buckets:
            lo, hi = self.owned_range(bucket)
            for p in bucket.params:
                start = self.offsets[p]
                a, b = max(lo, start), min(hi, start + p.numel())
                if a < b:
                    yield p, a, b


class _ChunkParamGather:
    """The param-gather pre-hooks of one model chunk: one per module holding parameters, and one on the chunk
    for the parameters that are read without their module's forward (learned on the chunk's first forward)."""

    def __init__(self, sync: GradSync, chunk: torch.nn.Module):
        self.sync = sync
        self.buckets_of = {}  # module -> the buckets of its own parameters
        for module in chunk.modules():
            buckets = {id(sync.bucket_of[p]): sync.bucket_of[p]
                       for p in module.parameters(recurse=False) if p in sync.bucket_of}
            if buckets:
                self.buckets_of[module] = list(buckets.values())
        self.unhooked = None  # buckets of modules whose forward did not run; None until the first forward
        self.ran = set()
        chunk.register_forward_pre_hook(self._before_chunk)
        chunk.register_forward_hook(self._after_chunk)
        for module in self.buckets_of:
            if module is not chunk:
                module.register_forward_pre_hook(self._before_module)

    def _before_chunk(self, chunk, args) -> None:
        if self.unhooked is None:  # first forward: wait for everything, and see which modules run
            self.sync.finish_param_gather([b for buckets in self.buckets_of.values() for b in buckets])
        else:
            self.sync.finish_param_gather(self.unhooked)

    def _before_module(self, module, args) -> None:
        if self.unhooked is None:
            self.ran.add(module)
        self.sync.finish_param_gather(self.buckets_of[module])

    def _after_chunk(self, chunk, args, output) -> None:
        if self.unhooked is None:
            skipped = {id(b): b for m, buckets in self.buckets_of.items() if m not in self.ran for b in buckets}
            self.unhooked, self.ran = list(skipped.values()), set()


_PIECE_ATTRS = ("partition_dim", "sequence_parallel", "shared_embedding", "pipeline_replicated")


class DistributedOptimizer:
    """ZeRO-1 AdamW: the moments exist only for this data-parallel rank's slices of the flat buffers.

    `param_groups` are given in terms of model parameters (their weight decay); each owned piece of a
    parameter becomes a 1-D view of the param buffer with its `.grad` a view of the grad buffer, so the
    (fused) AdamW updates the shard in place; `step()` then all-gathers the parameters.
    """

    def __init__(self, param_groups: list[dict], grad_sync: GradSync, **adam_kwargs):
        self.grad_sync = grad_sync
        group_of = {p: i for i, g in enumerate(param_groups) for p in g["params"]}
        pieces: list[list[torch.Tensor]] = [[] for _ in param_groups]
        self.main_params, self.pieces = [], []  # pieces: (param, flat_lo, flat_hi, piece tensor)
        for p, a, b in grad_sync.shard_pieces():
            piece = grad_sync.param_buffer[a:b]
            piece.grad = grad_sync.grad_buffer[a:b]
            for attr in _PIECE_ATTRS:  # read by the global grad norm (count replicated params once)
                if hasattr(p, attr):
                    setattr(piece, attr, getattr(p, attr))
            pieces[group_of[p]].append(piece)
            self.main_params.append(piece)
            self.pieces.append((p, a, b, piece))
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
                  for g, ps in zip(param_groups, pieces) if ps]
        self.optimizer = torch.optim.AdamW(groups, **adam_kwargs)
        # The global norm sums each rank's owned pieces over every rank (DP shards x TP x PP pieces).
        self.grad_norm_group = dist.group.WORLD if dist.is_initialized() else None

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def reset_state(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None:
        """Zero the moments of `param` where `mask` (shaped like it) is True, in this rank's pieces of it."""
        flat = mask.flatten()
        start = self.grad_sync.offsets[param]
        for p, a, b, piece in self.pieces:
            if p is param:
                state = self.optimizer.state.get(piece, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key].masked_fill_(flat[a - start:b - start], 0.0)

    @torch.no_grad()
    def state_rows(self, param: torch.nn.Parameter, dim: int, index: torch.Tensor) -> dict:
        """What `restore_state_rows` needs to put back `param`'s moments at positions `index` along `dim`:
        copies of this rank's pieces of them (flat pieces cut across rows, so whole pieces are copied)."""
        saved = {"mask": torch.zeros_like(param, dtype=torch.bool).index_fill_(dim, index, True).flatten()}
        for p, a, _, piece in self.pieces:
            if p is param:
                state = self.optimizer.state.get(piece, {})
                saved[a] = {key: state[key].clone() for key in ("exp_avg", "exp_avg_sq") if key in state}
        return saved

    @torch.no_grad()
    def restore_state_rows(self, param: torch.nn.Parameter, dim: int, index: torch.Tensor, saved: dict) -> None:
        """Put back what `state_rows` copied; moments created since then are zeroed there."""
        start = self.grad_sync.offsets[param]
        for p, a, b, piece in self.pieces:
            if p is param:
                state, old = self.optimizer.state.get(piece, {}), saved.get(a, {})
                mask = saved["mask"][a - start:b - start]
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        before = old[key] if key in old else torch.zeros_like(state[key])
                        state[key].copy_(torch.where(mask, before, state[key]))

    def state_numel(self) -> int:
        """Elements of optimizer state (moments) held by this rank."""
        return sum(t.numel() for s in self.optimizer.state.values() for k, t in s.items() if k != "step")

    @torch.no_grad()
    def step(self) -> None:
        self.grad_sync.finish_param_gather()  # a bucket no forward used may still be gathering into the buffer
        self.optimizer.step()
        self.grad_sync.all_gather_params()

    @torch.no_grad()
    def gathered_state(self) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        """Per-parameter AdamW state (TP-local shapes), gathered over the data-parallel shards.

        Collective over the data-parallel group; moments not created yet come back as zeros."""
        sync = self.grad_sync
        out = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros_like(sync.grad_buffer)
            for _, a, b, piece in self.pieces:
                if key in self.optimizer.state[piece]:
                    flat[a:b] = self.optimizer.state[piece][key]
            _all_reduce_flat([flat], sync.dp_group, average=False)  # owned slices are disjoint: sum = gather
            for p in sync.params:
                out.setdefault(p, {})[key] = sync._view(flat, p).clone()
        step = self._step_count()
        for p in sync.params:
            out[p]["step"] = step.clone()
        return out

    def _step_count(self) -> torch.Tensor:
        steps = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        value = steps[0].clone().float() if steps else torch.zeros((), dtype=torch.float32)
        if dist.is_initialized():  # a rank may own no piece at all: take the max over ranks
            value = value.to(communication_device())  # non-fused AdamW keeps `step` on the CPU
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    @torch.no_grad()
    def load_gathered_state(self, state: dict[torch.nn.Parameter, dict[str, torch.Tensor]]) -> None:
        """Inverse of `gathered_state`: keep the owned slices of each parameter's moments."""
        device = self.grad_sync.grad_buffer.device
        for p, a, b, piece in self.pieces:
            start = self.grad_sync.offsets[p]
            slot = self.optimizer.state[piece]
            for key in ("exp_avg", "exp_avg_sq"):
                slot[key] = state[p][key].reshape(-1)[a - start:b - start].to(device).clone()
            slot["step"] = state[p]["step"].detach().float().reshape(()).to(device).clone()  # fused: on device
