"""Context parallelism: load-balanced chunks, rank layout, attention and training parity against one process.

Parity runs are float64 (see `tests/dist_utils.py`): CP changes only the order in which the same numbers are
summed (attention over keys in gathered rather than sequence order, weight gradients summed over CP ranks,
losses summed per CP rank first), which moves float64 results by ~1e-16 relative; the tolerances (1e-5 for
training, as every layout test; 1e-10 for one attention layer) are far above that and far below any error of
the split itself (a wrong mask, position or loss weight changes results at the 1e-2 level).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.parallel.context_parallel import ContextParallel, load_balanced_positions
from megatron_eff.parallel.state import coordinates_of, cp_coordinate_of, group_ranks, rank_of
from tests.dist_utils import GPT_TINY_FLAGS, ROOT, TINY_FLAGS, assert_same_run, free_port, run_layout

CP2 = ["--context-parallel-size", "2"]


def test_rank_r_holds_chunks_r_and_mirror():
    """s = 16, cp = 2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (Megatron-LM's)."""
    assert load_balanced_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert load_balanced_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([load_balanced_positions(24, r, 3) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))  # a partition of the sequence


def test_split_batch_takes_this_ranks_positions():
    batch = {"tokens": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8) + 100,
             "loss_mask": torch.ones(2, 8), "dataset_id": torch.tensor([3, 4])}
    local = ContextParallel(group=None, rank=1, size=2).split_batch(batch)
    assert local["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert local["labels"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    assert local["loss_mask"].shape == (2, 4)
    assert local["dataset_id"].tolist() == [3, 4]


def test_rank_layout_tp_cp_dp_pp():
    """Megatron's order: tp fastest, then cp, then dp, then pp; gradients reduce over dp x cp."""
    groups = group_ranks(tp=2, dp=2, pp=2, cp=2)
    assert groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert groups["dp"][:2] == [[0, 4], [1, 5]]
    assert groups["dp_cp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups["pp"][0] == [0, 8]
    assert groups["mp"][0] == [0, 1, 8, 9]  # one (dp, cp) coordinate's model
    for kind in ("tp", "cp", "dp", "dp_cp", "pp", "mp"):
        assert sorted(r for g in groups[kind] for r in g) == list(range(16)), kind
    for rank in range(24):
        t, d, p = coordinates_of(rank, tp=2, dp=2, cp=3)
        assert rank_of(t, d, p, tp=2, dp=2, cp_rank=cp_coordinate_of(rank, 2, 3), cp=3) == rank


@pytest.mark.parametrize("seq, cp", [(12, 4), (10, 2)])
def test_seq_length_must_divide_into_2cp_chunks(seq, cp):
    flags = [*TINY_FLAGS, "--context-parallel-size", str(cp), "--seq-length", str(seq)]
    with pytest.raises(ValueError, match=rf"--seq-length {seq} is not divisible by 2 x --context-parallel-size {cp}"):
        config_from_args(parse_args(flags))


def test_ring_attention_refuses_attention_dropout():
    """The ring's hand-written backward has no dropout; all-gathered K/V go through SDPA, which has."""
    with pytest.raises(ValueError, match="--attention-dropout 0.1 is not supported by --cp-comm-type p2p"):
        config_from_args(parse_args([*TINY_FLAGS, *CP2, "--attention-dropout", "0.1"]))
    config = config_from_args(parse_args([*TINY_FLAGS, *CP2, "--attention-dropout", "0.1", "--cp-comm-type",
                                          "allgather"]))
    assert config.parallel.cp_comm_type == "allgather"


def test_world_size_must_hold_cp():
    config = config_from_args(parse_args([*TINY_FLAGS, *CP2, "--tensor-model-parallel-size", "2"]))
    with pytest.raises(ValueError, match="--context-parallel-size 2"):
        config.parallel.data_parallel_size(6)
    assert config.parallel.data_parallel_size(8) == 2


@pytest.mark.parametrize("comm_type, cp", [("p2p", 2), ("allgather", 2), ("p2p", 3), ("p2p matmul", 3)])
def test_attention_matches_single_process(tmp_path, comm_type, cp):
    """Forward output, input gradient and (CP-summed) weight gradients of a RoPE GQA attention layer; cp = 3
    runs the ring through more hops than the mirrored pair of cp = 2; `matmul` the ring's blocks without the
    CPU flash kernels (the path other devices take)."""
    out = tmp_path / "attn.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cp), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "dist" / "run_cp_attention.py"),
           str(out), *comm_type.split()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    assert result["positions"] == [load_balanced_positions(8 * cp, r, cp).tolist() for r in range(cp)]
    for key in ("out_diff", "input_grad_diff", "weight_grad_diff"):
        assert result[key] <= 1e-10, (key, result[key])


@pytest.mark.parametrize("comm_type, positions", [("p2p", "rope"), ("allgather", "learned_absolute")])
def test_model_loss_and_gradients_cp2_match_single_process(tmp_path, comm_type, positions):
    """A whole GPT model under an uneven loss mask: the CP loss (averaged over the CP ranks) and the gradients
    (averaged likewise, as the dp x cp reduction does) equal one process's, not only up to a factor that
    Adam and gradient clipping would hide in the training tests below."""
    out = tmp_path / "model.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "dist" / "run_cp_model.py"), str(out),
           comm_type, positions]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    assert abs(result["loss"] - result["reference_loss"]) <= 1e-10 * result["reference_loss"]
    assert result["grad_diff"] <= 1e-10 * result["grad_scale"], result


@pytest.mark.slow
def test_llama_cp2_training_matches_single_process(tmp_path, llama_reference):
    """RoPE, GQA, SwiGLU: 5 steps of training with ring attention, losses and every parameter."""
    assert_same_run(run_layout(tmp_path / "cp2.pt", [*TINY_FLAGS, *CP2], 2), llama_reference)


@pytest.mark.slow
def test_gpt_cp2_allgather_training_matches_single_process(tmp_path, gpt_reference):
    """Learned absolute positions (placed at the global positions), LayerNorm, biases, tied embeddings."""
    flags = [*GPT_TINY_FLAGS, *CP2, "--cp-comm-type", "allgather"]
    assert_same_run(run_layout(tmp_path / "gpt_cp2.pt", flags, 2), gpt_reference)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    pytest.param(["--tensor-model-parallel-size", "2", "--sequence-parallel"], id="cp2-tp2-sp"),
    pytest.param(["--use-distributed-optimizer", "--overlap-grad-reduce"], id="cp2-dp2-distopt"),
    pytest.param(["--pipeline-model-parallel-size", "2"], id="cp2-pp2"),
])
def test_cp2_composes_with_tp_dp_pp(tmp_path, llama_reference, flags):
    run = run_layout(tmp_path / "cp2x2.pt", [*TINY_FLAGS, *CP2, *flags], 4)
    assert_same_run(run, llama_reference)


@pytest.mark.slow
def test_cp2_checkpoint_resumes_in_one_process(tmp_path, llama_reference):
    """Saved under CP2 (distributed optimizer: its moments sharded over the CP ranks) after 3 of 5 iterations,
    resumed without CP: iterations 4-5 and the final weights match the straight single-process run."""
    ckpt = tmp_path / "ckpt"
    run_layout(tmp_path / "first.pt", [*TINY_FLAGS, *CP2, "--use-distributed-optimizer", "--exit-interval", "3",
                                       "--save", str(ckpt)], 2)
    resumed = run_layout(tmp_path / "resumed.pt", [*TINY_FLAGS, "--load", str(ckpt)])
    assert resumed["losses"] == pytest.approx(llama_reference["losses"][3:], rel=1e-5)
    for name, ref in llama_reference["params"].items():
        diff = (resumed["params"][name] - ref).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("method,message", [(["--mst"], "--mst-hsa-pattern sparse"), (["--colm"], "--colm scores")])
def test_methods_that_need_whole_sequences_refuse_context_parallelism(method, message):
    from megatron_eff.arguments import config_from_args, parse_args

    with pytest.raises(ValueError, match=message):
        config_from_args(parse_args(["--mock-data", "--model-preset", "llama-tiny", "--context-parallel-size", "2",
                                     *method]))
