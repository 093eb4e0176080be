"""Pipeline parallelism: layer assignment, 1F1B / interleaved orders, and multi-process parity.

Unit tests check the pure parts: which layers each rank/chunk owns, warm-up counts and in-flight
activations of the orders, and (by simulating every rank's batched send/recv with rendezvous semantics)
that the schedules' communication can never deadlock and pairs every message with the right receive.
The slow tests train 5 iterations under torchrun (gloo, CPU) and must reproduce one single-process run.
"""

from __future__ import annotations

import pytest
import torch

from megatron_eff.parallel.pipeline import (
    interleaved_order,
    interleaved_steps,
    one_f_one_b_order,
    pipeline_layer_ranges,
    recv_spec,
    send_spec,
)
from tests.dist_utils import GPT_TINY_FLAGS, TINY_FLAGS, assert_same_run, run_layout

PP2 = ["--pipeline-model-parallel-size", "2"]
VPP1 = ["--num-layers-per-virtual-pipeline-stage", "1"]
TP2 = ["--tensor-model-parallel-size", "2"]


def test_layer_ranges():
    assert pipeline_layer_ranges(4, 2) == [[(0, 2)], [(2, 4)]]
    assert pipeline_layer_ranges(4, 4) == [[(0, 1)], [(1, 2)], [(2, 3)], [(3, 4)]]
    assert pipeline_layer_ranges(4, 2, 1) == [[(0, 1), (2, 3)], [(1, 2), (3, 4)]]
    assert pipeline_layer_ranges(8, 2, 2) == [[(0, 2), (4, 6)], [(2, 4), (6, 8)]]
    assert pipeline_layer_ranges(6, 1) == [[(0, 6)]]


def _max_in_flight(order) -> int:
    alive = peak = 0
    for action in order:
        alive += 1 if action[0] == "F" else -1
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("pp, m", [(2, 4), (4, 4), (4, 8), (4, 2), (3, 1)])
def test_one_f_one_b_order(pp, m):
    for r in range(pp):
        order = one_f_one_b_order(pp, r, m)
        warmup = next(i for i, (kind, _) in enumerate(order + [("B", -1)]) if kind == "B")
        assert warmup == min(pp - r - 1, m) + (1 if m > pp - r - 1 else 0)  # warm-up forwards + the first steady F
        assert sorted(order) == sorted([("F", k) for k in range(m)] + [("B", k) for k in range(m)])
        assert [k for kind, k in order if kind == "F"] == list(range(m))
        assert [k for kind, k in order if kind == "B"] == list(range(m))
        assert _max_in_flight(order) <= pp - r
        assert _max_in_flight(order) == min(pp - r, m)
    assert one_f_one_b_order(4, 0, 8)[:5] == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0)]
    assert one_f_one_b_order(4, 3, 8)[:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert one_f_one_b_order(2, 0, 3, forward_only=True) == [("F", 0), ("F", 1), ("F", 2)]


def test_interleaved_order_matches_megatron():
    # P = 2, V = 2, M = 4: rank 0 warms up 2(P-r-1) + (V-1)P = 4 forwards, rank 1 two.
    assert interleaved_order(2, 0, 4, 2)[:6] == [
        ("F", 0, 0), ("F", 0, 1), ("F", 1, 0), ("F", 1, 1), ("F", 0, 2), ("B", 1, 0)]
    assert interleaved_order(2, 1, 4, 2)[:4] == [("F", 0, 0), ("F", 0, 1), ("F", 1, 0), ("B", 1, 0)]
    # M == P: all forwards first (Megatron's special case).
    order = interleaved_order(2, 1, 2, 2)
    assert [a[0] for a in order] == ["F"] * 4 + ["B"] * 4
    for pp, m, v in [(2, 4, 2), (4, 8, 2), (2, 6, 3)]:
        for r in range(pp):
            order = interleaved_order(pp, r, m, v)
            expected = [(kind, c, k) for kind in "FB" for c in range(v) for k in range(m)]
            assert sorted(order) == sorted(expected)
            first_b = next(i for i, a in enumerate(order) if a[0] == "B")
            assert first_b == min(2 * (pp - r - 1) + (v - 1) * pp, m * v) + 1
    with pytest.raises(ValueError, match="multiple of --pipeline-model-parallel-size"):
        interleaved_order(4, 0, 6, 2)


def _simulate(steps: list[list[list[tuple]]], pp: int, chunks: int) -> None:
    """Run every rank's steps with rendezvous semantics: before step j a rank posts one batch (the sends
    of step j-1 and the receives of step j) and waits until each op in it is matched by a posted op of
    the peer. Per (src, dst, tag) stream, the n-th send must meet the n-th receive and carry what it
    expects. Fails on a deadlock or a mismatched message."""

    def message(rank, action, sending):  # identity of the tensor: (tag, producing rank, chunk, micro)
        kind, chunk, k = action
        if sending:
            return (0 if kind == "F" else 1, rank, chunk, k)
        if kind == "F":
            return (0, (rank - 1) % pp, chunk - (rank == 0), k)
        return (1, (rank + 1) % pp, chunk + (rank == pp - 1), k)

    batches = []
    for r, rank_steps in enumerate(steps):
        rank_batches, pending = [], []
        for step in rank_steps:
            specs = [(recv_spec(a, pp, r, chunks), a) for a in step]
            rank_batches.append(pending + [("recv", *spec, message(r, a, False)) for spec, a in specs if spec])
            specs = [(send_spec(a, pp, r, chunks), a) for a in step]
            pending = [("send", *spec, message(r, a, True)) for spec, a in specs if spec]
        rank_batches.append(pending)
        batches.append(rank_batches)
    streams: dict[tuple, list] = {}  # (src, dst, tag, 'send'|'recv') -> messages in posting order
    position, posted = [0] * pp, [False] * pp
    while any(position[r] < len(batches[r]) for r in range(pp)):
        for r in range(pp):  # post current batches
            if position[r] < len(batches[r]) and not posted[r]:
                for op, peer, tag, msg in batches[r][position[r]]:
                    key = (r, peer, tag, "send") if op == "send" else (peer, r, tag, "recv")
                    streams.setdefault(key, []).append(msg)
                posted[r] = True
        progressed = False
        for r in range(pp):
            if position[r] >= len(batches[r]):
                continue
            done = True
            for op, peer, tag, msg in batches[r][position[r]]:
                src, dst = (r, peer) if op == "send" else (peer, r)
                sent, received = streams.get((src, dst, tag, "send"), []), streams.get((src, dst, tag, "recv"), [])
                mine = sent if op == "send" else received
                index = len(mine) - 1 - mine[::-1].index(msg)
                if index >= min(len(sent), len(received)):
                    done = False
                else:
                    assert sent[index] == received[index], f"{src}->{dst} tag {tag}: {sent[index]} != {received[index]}"
            if done:
                position[r], posted[r], progressed = position[r] + 1, False, True
        assert progressed, f"deadlock at positions {position}"


@pytest.mark.parametrize("pp, m", [(2, 1), (2, 4), (3, 5), (4, 4), (4, 8), (4, 2)])
def test_one_f_one_b_communication_never_deadlocks(pp, m):
    for forward_only in (False, True):
        steps = [[[(kind, 0, k)] for kind, k in one_f_one_b_order(pp, r, m, forward_only)] for r in range(pp)]
        _simulate(steps, pp, 1)


@pytest.mark.parametrize("pp, m, v", [(2, 2, 2), (2, 4, 2), (2, 8, 4), (4, 4, 2), (4, 8, 2), (4, 12, 3), (3, 6, 2)])
def test_interleaved_communication_never_deadlocks(pp, m, v):
    for forward_only in (False, True):
        _simulate([interleaved_steps(pp, r, m, v, forward_only) for r in range(pp)], pp, v)


def test_simulation_catches_a_deadlock():
    """Sanity check of `_simulate`: the interleaved order with a batch before every single action (instead
    of Megatron's steady (forward, backward) pairs) deadlocks under rendezvous sends."""
    singles = [[[a] for a in interleaved_order(2, r, 4, 2)] for r in range(2)]
    with pytest.raises(AssertionError, match="deadlock"):
        _simulate(singles, 2, 2)


# TINY_FLAGS / GPT_TINY_FLAGS clip every step (--clip-grad 0.05), so the final parameters also check the
# global grad norm (summed over TP x PP, replicated TP params and the tied embedding copy counted once).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, flags, nproc",
    [
        ("pp2", PP2, 2),
        ("pp2-vpp", [*PP2, *VPP1], 2),
        ("pp2-dp2-vpp-distopt-overlap", [*PP2, *VPP1, "--use-distributed-optimizer", "--overlap-grad-reduce",
                                         "--overlap-param-gather", "--ddp-bucket-size", "4000"], 4),
        ("tp2-pp2", [*TP2, *PP2], 4),
        ("tp2-pp2-sp-vpp", [*TP2, *PP2, *VPP1, "--sequence-parallel"], 4),
        ("tp2-pp2-dp2", [*TP2, *PP2], 8),
    ],
)
def test_llama_pipeline_layouts_match_single_process(tmp_path, llama_reference, name, flags, nproc):
    run = run_layout(tmp_path / f"{name}.pt", [*TINY_FLAGS, *flags], nproc)
    assert_same_run(run, llama_reference)


@pytest.mark.slow
def test_gpt_pp2_tied_embedding_matches_single_process(tmp_path, gpt_reference):
    """Tied embeddings across stages: the last stage's output-layer copy gets the summed gradient, so after
    5 steps it still equals the first stage's embedding, and the run equals the single-process one."""
    run = run_layout(tmp_path / "pp2.pt", [*GPT_TINY_FLAGS, *PP2], 2)
    assert_same_run(run, gpt_reference)
    copy = run["tied_copies"]["output_layer.weight"]
    assert torch.equal(copy, run["params"]["embedding.word_embeddings.weight"])
