"""Forward/backward schedules over the micro-batches of one iteration: no pipelining, 1F1B, interleaved 1F1B.

    schedule = get_forward_backward_func(pstate, virtual=len(model_chunks) > 1)
    results = schedule(model_chunks, micro_batches, M, pstate=pstate, tensor_shape=activation_shape(...),
                       forward_step=lm_forward_step, forward_only=False, autocast=..., loss_scale=1.0,
                       per_token_loss=False)

The loss contract (Megatron's): `forward_step(chunk, batch, input_tensor) -> (output, loss_func)` runs one
model chunk on one micro-batch (`batch`: every key the data pipeline collated, `dataset_id` and `loss_mask`
included); on the chunk holding the output layer `loss_func(output) -> (loss_sum, num_tokens, report)`
turns the output into a scalar sum of token losses, the number of tokens it covers and a dict of detached
values to report (per-sample losses, per-domain sums, ...). Backward starts from
`loss_sum / num_tokens * loss_scale / M` (each micro-batch's token mean; the iteration's loss is their mean
over micro-batches and DP ranks), or, with `per_token_loss`, from `loss_sum * loss_scale` (the caller then
divides the gradients by the global token count: Megatron's `--calculate-per-token-loss`). Every schedule
returns, on the last pipeline stage, one `MicroBatchLoss(loss_sum, num_tokens, report)` per micro-batch
in micro-batch order (detached), and an empty list on the other stages. With `forward_only` nothing is kept
for backward: evaluation, per-domain validation and per-sample scoring use that mode through any layout.

Layer assignment (`pipeline_layer_ranges`): stage r of P owns the contiguous block of L/P layers; with
`--num-layers-per-virtual-pipeline-stage n` (Megatron's interleaving) rank r holds V = L/(P n) model
chunks, chunk v holding layers `[(v P + r) n, (v P + r + 1) n)`. The embedding lives on (rank 0, chunk 0),
the final norm and output layer on (rank P-1, chunk V-1); activations flow rank r -> r+1 inside a chunk
index and from rank P-1, chunk v to rank 0, chunk v+1 (a ring).

Schedules. We wrote them here rather than using `torch.distributed.pipelining`: ours take the model
chunks the rest of the code builds (global layer names, tied embedding copy, TP/SP layers inside), run on
gloo, and keep Megatron's orders exactly (the design's contract): the order of one rank is a pure function
(`one_f_one_b_order`, `interleaved_order`) that tests check for warm-up counts, in-flight activations and,
by simulating every rank's communication, for deadlock freedom.

- non-interleaved 1F1B: `min(P - r - 1, M)` warm-up forwards, then alternate one forward / one backward,
  then the remaining backwards; at most `P - r` micro-batches' activations are alive on stage r.
- interleaved 1F1B (Megatron-core's order): virtual micro-batch k runs on chunk `(k mod PV) div P` (in
  reverse for backwards) and is micro-batch `(k div PV) P + k mod P`; warm-up `2 (P - r - 1) + (V - 1) P`
  forwards (all of them when M == P). M must be a multiple of P.

Point-to-point communication, as Megatron batches it: the order is cut into steps (1F1B: every action;
interleaved: warm-up forwards, steady (forward, backward) pairs, cool-down backwards); before each step
one batch (`dist.batch_isend_irecv`, which gloo runs too) posts the sends the previous step produced with
the receives this step needs, and waits for all of them; the last sends go after the last step. Since a
send may wait for its matching receive (NCCL, gloo), the tests simulate every rank's batches with such
rendezvous semantics to show it cannot deadlock (a batch before every single interleaved action would).
Activations use tag 0, gradients tag 1, so the two streams between a pair of ranks never mix (P = 2
interleaved sends both ways). Every rank can compute the shape of what it receives: `[s, b, h]`
(`[s/tp, b, h]` with sequence parallel, each TP rank sending its own shard to the same TP rank of the next
stage) in the parameters' dtype — the residual stream stays float32 under BF16/FP16 autocast (parameters are
FP32 master weights), so the sender casts to it (a no-op in practice) and the receiver allocates it.
A rank keeps the received input and the output of each micro-batch from its forward to its backward
only, so 1F1B holds at most `P - r` of them.

Data: every stage pulls the same micro-batches from its iterator, in micro-batch order, one per
micro-batch (not per chunk); only the first chunk reads `tokens` and only the last reads `labels`. The data
pipeline builds CPU tensors; the schedules move each micro-batch to the model's device as they pull it
(`batch_to_device`), so training, validation and `tools/evaluate.py` all get it there the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_eff.model.loss import lm_forward_step

ACTIVATION_TAG, GRADIENT_TAG = 0, 1
Action = tuple[str, int, int]  # ('F' | 'B', model chunk, micro-batch)


class MicroBatchLoss(NamedTuple):
    """What `loss_func` gave for one micro-batch (detached): token-loss sum, token count, report."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    report: dict


def _backward_loss(loss_sum: torch.Tensor, num_tokens: torch.Tensor, loss_scale: float, num_micro_batches: int,
                   per_token_loss: bool) -> torch.Tensor:
    """The scalar backward starts from (see the module docstring)."""
    if per_token_loss:
        return loss_sum * loss_scale
    return loss_sum / num_tokens.clamp(min=1) * (loss_scale / num_micro_batches)


def pipeline_layer_ranges(num_layers: int, pp: int, vpp_layers: int | None = None) -> list[list[tuple[int, int]]]:
    """Per pipeline rank, per model chunk, the global layer range `(first, last)` (last exclusive)."""
    if not vpp_layers:
        per_stage = num_layers // pp
        return [[(r * per_stage, (r + 1) * per_stage)] for r in range(pp)]
    chunks = num_layers // (pp * vpp_layers)
    return [[((v * pp + r) * vpp_layers, (v * pp + r + 1) * vpp_layers) for v in range(chunks)] for r in range(pp)]


def activation_shape(seq_length: int, micro_batch_size: int, hidden_size: int, tp_size: int = 1,
                     sequence_parallel: bool = False) -> tuple[int, int, int]:
    """What flows between stages: `[s, b, h]`, or `[s/tp, b, h]` with sequence parallel."""
    return (seq_length // tp_size if sequence_parallel else seq_length, micro_batch_size, hidden_size)


def one_f_one_b_order(pp: int, rank: int, num_micro_batches: int, forward_only: bool = False) -> list[tuple[str, int]]:
    """Non-interleaved 1F1B order of stage `rank`: [('F' | 'B', micro-batch), ...]."""
    m = num_micro_batches
    if forward_only:
        return [("F", k) for k in range(m)]
    warmup = min(pp - rank - 1, m)
    order = [("F", k) for k in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", k) for k in range(m - warmup, m)]


def check_interleaved(num_micro_batches: int, pp: int, derivation: str = "") -> None:
    """Interleaved 1F1B takes the micro-batches `pp` at a time: their number must be a multiple of `pp`.
    `derivation` (the batch-size flags, as `launch.check_launch` gives them) goes before the number."""
    if num_micro_batches % pp:
        raise ValueError(f"interleaved pipelining (--num-layers-per-virtual-pipeline-stage) needs the number of "
                         f"micro-batches, {derivation}{num_micro_batches}, to be a multiple of "
                         f"--pipeline-model-parallel-size {pp}")


def interleaved_steps(pp: int, rank: int, num_micro_batches: int, num_chunks: int,
                      forward_only: bool = False) -> list[list[Action]]:
    """Megatron-core's interleaved 1F1B order of pipeline rank `rank`, cut into the steps between which
    it communicates: single forwards (warm-up), (forward, backward) pairs (steady), single backwards."""
    m, v = num_micro_batches, num_chunks
    check_interleaved(m, pp)
    total = m * v
    warmup = total if forward_only or m == pp else min(2 * (pp - rank - 1) + (v - 1) * pp, total)

    def action(kind: str, k: int) -> Action:
        c = (k % (pp * v)) // pp
        return (kind, c if kind == "F" else v - 1 - c, (k // (pp * v)) * pp + k % pp)

    steps = [[action("F", k)] for k in range(warmup)]
    steps += [[action("F", warmup + i), action("B", i)] for i in range(total - warmup)]
    if forward_only:
        return steps
    return steps + [[action("B", k)] for k in range(total - warmup, total)]


def interleaved_order(pp: int, rank: int, num_micro_batches: int, num_chunks: int,
                      forward_only: bool = False) -> list[Action]:
    """The flat interleaved order: [('F' | 'B', chunk, micro-batch), ...]."""
    return [a for step in interleaved_steps(pp, rank, num_micro_batches, num_chunks, forward_only) for a in step]


def recv_spec(action: Action, pp: int, rank: int, num_chunks: int) -> tuple[int, int] | None:
    """(pipeline rank to receive from, tag) for what `action` needs, or None (global first/last chunk)."""
    kind, chunk, _ = action
    if kind == "F":
        return None if (rank == 0 and chunk == 0) else ((rank - 1) % pp, ACTIVATION_TAG)
    return None if (rank == pp - 1 and chunk == num_chunks - 1) else ((rank + 1) % pp, GRADIENT_TAG)


def send_spec(action: Action, pp: int, rank: int, num_chunks: int) -> tuple[int, int] | None:
    """(pipeline rank to send to, tag) for what `action` produces, or None."""
    kind, chunk, _ = action
    if kind == "F":
        return None if (rank == pp - 1 and chunk == num_chunks - 1) else ((rank + 1) % pp, ACTIVATION_TAG)
    return None if (rank == 0 and chunk == 0) else ((rank - 1) % pp, GRADIENT_TAG)


def _exchange(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[int, int] | None], shape, pstate,
              device: torch.device, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Post `sends` [(tensor, pp rank, tag)] and `recvs` [(pp rank, tag) or None] in one batch, activations
    before gradients (so a pair of ranks issues them in the same order on both sides); wait for all."""
    buffers = [None if r is None else torch.empty(shape, dtype=dtype, device=device) for r in recvs]
    ops = [(tag, dist.P2POp(dist.isend, t, pstate.pp_ranks[peer], pstate.pp_group, tag)) for t, peer, tag in sends]
    ops += [(r[1], dist.P2POp(dist.irecv, buf, pstate.pp_ranks[r[0]], pstate.pp_group, r[1]))
            for r, buf in zip(recvs, buffers) if r is not None]
    if ops:
        for work in dist.batch_isend_irecv([op for _, op in sorted(ops, key=lambda item: item[0])]):
            work.wait()
    return buffers


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors on `device` (a no-op when they are there; asynchronous from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


class _MicroBatches:
    """Pulls micro-batches from the iterator once each, in order (onto `device`), and drops them after the
    last chunk."""

    def __init__(self, micro_batches: Iterable[dict[str, torch.Tensor]], device: torch.device):
        self.source: Iterator = iter(micro_batches)
        self.device = device
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self.pulled = 0

    def get(self, k: int) -> dict[str, torch.Tensor]:
        while self.pulled <= k:
            self.cache[self.pulled] = batch_to_device(next(self.source), self.device)
            self.pulled += 1
        return self.cache[k]


def _run_pipeline(steps: list[list[Action]], model_chunks, micro_batches, num_micro_batches: int, *, pstate,
                  tensor_shape, forward_only: bool, autocast, loss_scale: float, forward_step,
                  per_token_loss: bool) -> list[MicroBatchLoss]:
    """Execute one rank's steps; before each step one batch sends what the previous step produced and
    receives what this step needs (see the module docstring)."""
    pp, rank, num_chunks = pstate.pp_size, pstate.pp_rank, len(model_chunks)
    first_param = next(model_chunks[0].parameters())
    device, wire_dtype = first_param.device, first_param.dtype
    data = _MicroBatches(micro_batches, device)
    inputs: dict[tuple[int, int], torch.Tensor | None] = {}  # (chunk, micro) -> received activation
    outputs: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, micro) -> output awaiting its backward
    losses: dict[int, MicroBatchLoss] = {}
    sends: list[tuple[torch.Tensor, int, int]] = []
    for step in steps:
        recvs = [recv_spec(action, pp, rank, num_chunks) for action in step]
        received = _exchange(sends, recvs, tensor_shape, pstate, device, wire_dtype)
        sends = []
        for action, tensor in zip(step, received):
            kind, chunk, k = action
            if kind == "F":
                out, loss_func = _forward_step(forward_step, model_chunks[chunk], data.get(k), tensor, forward_only,
                                               autocast, wire_dtype)
                if loss_func is not None:
                    loss_sum, num_tokens, report = loss_func(out)
                    losses[k] = MicroBatchLoss(loss_sum.detach(), num_tokens.detach(), report)
                    out = _backward_loss(loss_sum, num_tokens, loss_scale, num_micro_batches, per_token_loss)
                if chunk == num_chunks - 1:
                    data.cache.pop(k, None)
                if not forward_only:
                    inputs[(chunk, k)], outputs[(chunk, k)] = tensor, out
            else:
                tensor_in, out = inputs.pop((chunk, k)), outputs.pop((chunk, k))
                torch.autograd.backward(out, grad_tensors=tensor)
                out = None if tensor_in is None else tensor_in.grad
            target = send_spec(action, pp, rank, num_chunks)
            if target is not None:
                sends.append((out.detach(), *target))
    _exchange(sends, [], tensor_shape, pstate, device, wire_dtype)
    return [losses[k] for k in sorted(losses)]


def _forward_step(forward_step, model, batch, input_tensor, forward_only: bool, autocast, wire_dtype):
    """(output, loss_func): the last chunk's output for its loss function, or the hidden `[s, b, h]` in
    `wire_dtype` to send on (None)."""
    if input_tensor is not None and not forward_only:
        input_tensor.requires_grad_(True)
    with autocast():
        out, loss_func = forward_step(model, batch, input_tensor)
    return (out, loss_func) if loss_func is not None else (out.to(wire_dtype), None)  # a no-op in practice


def _chunks(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def forward_backward_no_pipelining(
    model: torch.nn.Module | list[torch.nn.Module],
    micro_batches: Iterable[dict[str, torch.Tensor]],
    num_micro_batches: int,
    *,
    forward_only: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_scale: float = 1.0,
    forward_step=lm_forward_step,
    per_token_loss: bool = False,
    pstate=None,  # accepted so every schedule has one signature; unused
    tensor_shape=None,
) -> list[MicroBatchLoss]:
    """One stage: forward and backward of each micro-batch in turn."""
    (model,) = _chunks(model)
    device = next(model.parameters()).device
    losses = []
    for _, batch in zip(range(num_micro_batches), micro_batches):
        batch = batch_to_device(batch, device)
        with autocast():
            out, loss_func = forward_step(model, batch, None)
        loss_sum, num_tokens, report = loss_func(out)
        if not forward_only:
            _backward_loss(loss_sum, num_tokens, loss_scale, num_micro_batches, per_token_loss).backward()
        losses.append(MicroBatchLoss(loss_sum.detach(), num_tokens.detach(), report))
    return losses


def forward_backward_pipelining_without_interleaving(
    model, micro_batches, num_micro_batches: int, *, pstate, tensor_shape, forward_only: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, loss_scale: float = 1.0,
    forward_step=lm_forward_step, per_token_loss: bool = False,
) -> list[MicroBatchLoss]:
    """Non-interleaved 1F1B over the pipeline group (one model chunk per rank)."""
    steps = [[(kind, 0, k)] for kind, k in one_f_one_b_order(pstate.pp_size, pstate.pp_rank, num_micro_batches,
                                                            forward_only)]
    return _run_pipeline(steps, _chunks(model), micro_batches, num_micro_batches, pstate=pstate,
                         tensor_shape=tensor_shape, forward_only=forward_only, autocast=autocast,
                         loss_scale=loss_scale, forward_step=forward_step, per_token_loss=per_token_loss)


def forward_backward_pipelining_with_interleaving(
    model, micro_batches, num_micro_batches: int, *, pstate, tensor_shape, forward_only: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, loss_scale: float = 1.0,
    forward_step=lm_forward_step, per_token_loss: bool = False,
) -> list[MicroBatchLoss]:
    """Interleaved 1F1B over the pipeline group (several model chunks per rank)."""
    chunks = _chunks(model)
    steps = interleaved_steps(pstate.pp_size, pstate.pp_rank, num_micro_batches, len(chunks), forward_only)
    return _run_pipeline(steps, chunks, micro_batches, num_micro_batches, pstate=pstate,
                         tensor_shape=tensor_shape, forward_only=forward_only, autocast=autocast,
                         loss_scale=loss_scale, forward_step=forward_step, per_token_loss=per_token_loss)


def get_forward_backward_func(pstate, virtual: bool = False) -> Callable[..., list[MicroBatchLoss]]:
    """The schedule for this layout: no pipelining (P = 1), 1F1B, or interleaved 1F1B (`virtual`)."""
    if pstate.pp_size == 1:
        return forward_backward_no_pipelining
    if virtual:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving
