"""Rank layout: TP fastest, then DP, then PP (Megatron's order)."""

import pytest
import torch

from megatron_eff.parallel.state import coordinates_of, group_ranks, rank_of, use_cuda


def test_tp_fastest_then_dp_then_pp():
    groups = group_ranks(tp=2, dp=2, pp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert groups["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_coordinates_round_trip():
    for rank in range(24):
        t, d, p = coordinates_of(rank, tp=2, dp=3)
        assert rank_of(t, d, p, tp=2, dp=3) == rank


def test_every_rank_in_exactly_one_group_of_each_kind():
    groups = group_ranks(tp=2, dp=3, pp=2)
    for kind in ("tp", "dp", "pp", "mp"):
        flat = sorted(r for g in groups[kind] for r in g)
        assert flat == list(range(12)), kind


def test_device_override(monkeypatch):
    """MEGATRON_EFF_DEVICE=cpu keeps runs (and torchrun's process group) off a GPU; bad values are named."""
    monkeypatch.setenv("MEGATRON_EFF_DEVICE", "cpu")
    assert use_cuda() is False
    monkeypatch.setenv("MEGATRON_EFF_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="MEGATRON_EFF_DEVICE='gpu0'"):
        use_cuda()
    monkeypatch.delenv("MEGATRON_EFF_DEVICE")
    assert use_cuda() is torch.cuda.is_available()
