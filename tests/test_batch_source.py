"""BatchSource: the old sampler's batches, exact resume, draw/select, live blend weights with worker processes,
the exhausted-member error and per-domain validation sets. Tiny .bin/.idx data in tmp_path."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_eff.data.batch_source import BatchSource
from megatron_eff.data.blended_dataset import DatasetExhaustedError
from megatron_eff.data.builders import build_datasets, build_train_valid_test_datasets, collate_samples
from megatron_eff.data.indexed_dataset import IndexedDatasetBuilder
from megatron_eff.data.samplers import micro_batches

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = 1_000_000  # token // DOMAIN is the member a token comes from


def make_prefix(directory, name, num_docs=40, seed=0, base=0):
    """Documents of random length whose tokens are unique: doc d holds base + d*1000 + i."""
    rng = np.random.RandomState(seed)
    prefix = str(directory / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for d in range(num_docs):
        builder.add_item(base + d * 1000 + np.arange(rng.randint(1, 40)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def blend_path(tmp_path, weights=(0.5, 0.5)):
    data_path = []
    for k, w in enumerate(weights):
        data_path += [str(w), make_prefix(tmp_path, f"domain{k}", seed=k, base=k * DOMAIN)]
    return data_path


def equal_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_same_batches_as_the_sampler(tmp_path):
    train, _, _ = build_train_valid_test_datasets(blend_path(tmp_path, (0.6, 0.4)), "1,0,0", (96, 0, 0), 8, 3)
    for consumed in (0, 24):  # 24: resumed after two global batches of 12
        for dp_rank in range(2):
            old = list(micro_batches(train, consumed, 3, dp_rank, 2))
            for workers in (0, 2):
                source = BatchSource(train, micro_batch_size=3, num_micro_batches=2, dp_rank=dp_rank, dp_size=2,
                                     num_workers=workers, consumed_samples=consumed)
                new = [b for _ in range(len(old) // 2) for b in source.next_global_batch()]
                assert equal_batches(new, old)
                assert source.consumed_samples == 96
                assert new[0].keys() == {"tokens", "labels", "dataset_id", "loss_mask"}
                with pytest.raises(DatasetExhaustedError, match="holds 96 samples"):
                    source.next_global_batch()


def test_resume_from_state_dict_with_weight_changes(tmp_path):
    data_path = blend_path(tmp_path, (0.5, 0.5))

    def fresh():
        train, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (120, 0, 0), 8, 3, max_blend_weight=1.0)
        return BatchSource(train, micro_batch_size=2, num_micro_batches=3, seed=5)

    def run(source, steps):
        out = []
        for step in steps:
            if step == "w1":
                source.set_weights([0.9, 0.1])
            elif step == "w2":
                source.set_weights([0.2, 0.8])
            else:
                out += source.next_global_batch()
                out.append({"rng": torch.tensor(source.selection_rng.integers(0, 1 << 30))})
        return out

    plan = ["b", "w1", "b", "b", "w2", "b", "b", "w1", "b"]
    straight = run(fresh(), plan)
    first = fresh()
    head = run(first, plan[:4])
    state = first.state_dict()
    assert state["consumed_samples"] == 18 and [s for s, _ in state["weight_schedule"]] == [0, 6]
    resumed = fresh()
    resumed.load_state_dict(state)
    assert equal_batches(head + run(resumed, plan[4:]), straight)


def test_draw_and_select(tmp_path):
    train, _, _ = build_train_valid_test_datasets(blend_path(tmp_path, (0.7, 0.3)), "1,0,0", (96, 0, 0), 8, 3)
    chosen = [11, 0, 5, 7, 2, 9, 3, 1]  # the same list on every rank
    for dp_rank in range(2):
        source = BatchSource(train, micro_batch_size=2, num_micro_batches=2, dp_rank=dp_rank, dp_size=2)
        source.next_global_batch()  # 8 samples read
        pool = source.draw(12)
        assert source.consumed_samples == 20 and pool.first_sample == 8
        assert pool.dataset_indices.tolist() == list(range(8, 20))
        assert pool.dataset_ids.tolist() == [train[i]["dataset_id"] for i in range(8, 20)]
        assert equal_batches(pool.micro_batches, list(micro_batches(train, 8, 2, dp_rank, 2))[:3])
        share = collate_samples([train[8 + p] for p in pool.positions])
        assert torch.equal(share["tokens"], torch.cat([b["tokens"] for b in pool.micro_batches]))
        selected = source.select(chosen)
        mine = chosen[dp_rank * 4 : dp_rank * 4 + 4]  # rank r: the r-th contiguous slice, 2 micro-batches
        expected = [collate_samples([train[8 + p] for p in mine[k : k + 2]]) for k in (0, 2)]
        assert equal_batches(selected, expected)
        assert source.consumed_samples == 20  # select reads the pool, not new samples
    with pytest.raises(ValueError, match="multiple of 4"):
        source.select([0, 1, 2])


def test_live_weights_with_workers_drop_prefetched_batches(tmp_path):
    data_path = blend_path(tmp_path, (0.5, 0.5))
    train, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (400, 0, 0), 8, 3, max_blend_weight=1.0)
    reference, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (400, 0, 0), 8, 3, max_blend_weight=1.0)
    source = BatchSource(train, micro_batch_size=4, num_micro_batches=2, dp_rank=1, dp_size=2, num_workers=2)
    in_process = BatchSource(reference, micro_batch_size=4, num_micro_batches=2, dp_rank=1, dp_size=2)
    for _ in range(3):  # the loader reads ahead of these under the old weights
        assert equal_batches(source.next_global_batch(), in_process.next_global_batch())
    source.set_weights([0.0, 1.0])
    in_process.set_weights([0.0, 1.0])
    after = source.next_global_batch()
    assert all(bool((b["dataset_id"] == 1).all()) for b in after)  # a prefetched old-weight batch would mix
    assert all(bool((b["tokens"] // DOMAIN == 1).all()) for b in after)
    assert equal_batches(after, in_process.next_global_batch())
    source.set_weights([0.2, 0.8])
    in_process.set_weights([0.2, 0.8])
    ids = []
    for _ in range(10):
        batches = source.next_global_batch()
        assert equal_batches(batches, in_process.next_global_batch())
        ids += [int(i) for b in batches for i in b["dataset_id"]]
    assert abs(np.mean(np.array(ids) == 1) - 0.8) < 0.1  # this rank's 80 samples follow the new weights
    schedule = source.state_dict()["weight_schedule"]
    assert [s for s, _ in schedule] == [0, 48, 64] and schedule[2][1] == pytest.approx([0.2, 0.8])


def test_exhausted_member_names_prefix_and_counts(tmp_path):
    data_path = blend_path(tmp_path, (0.5, 0.5))
    train, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (200, 0, 0), 8, 3)  # initial sizes
    member_size = len(train.datasets[0])
    assert member_size == 101  # ceil(0.5 * 200 * 1.005)
    source = BatchSource(train, micro_batch_size=4, num_micro_batches=2, num_workers=2)
    source.next_global_batch()
    source.set_weights([1.0, 0.0])  # member 0 alone now: its 101 samples run out before 200
    with pytest.raises(DatasetExhaustedError, match=rf"domain0\) .*holds {member_size} samples but 102 were asked"):
        for _ in range(25):
            source.next_global_batch()
    # 4 of member 0's samples in the first 8, then 97 more: blended sample 105 would be its 102nd, so the
    # global batch 104..111 fails and nothing of it counts as consumed.
    assert source.consumed_samples == 104
    sized, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (200, 0, 0), 8, 3, max_blend_weight=1.0)
    assert all(len(d) >= 200 for d in sized.datasets)
    source = BatchSource(sized, micro_batch_size=4, num_micro_batches=2)
    source.set_weights([1.0, 0.0])
    for _ in range(25):
        source.next_global_batch()
    assert source.consumed_samples == 200


def test_per_domain_validation_sets(tmp_path):
    data_path = blend_path(tmp_path, (0.8, 0.2))
    datasets = build_datasets(data_path, "80,20,0", (100, 30, 0), 8, 3)
    assert list(datasets.valid_per_domain) == ["domain0", "domain1"] == datasets.valid.member_names
    valid_docs = {k: set(d.document_ids.tolist()) for k, d in enumerate(datasets.valid.datasets)}
    for k, domain in enumerate(datasets.valid_per_domain.values()):
        assert len(domain) == 30 and domain.name == "valid"
        assert set(domain.document_ids.tolist()) == valid_docs[k]  # the member's valid split only
        tokens = np.concatenate([domain[i]["tokens"] for i in range(len(domain))])
        assert set((tokens // DOMAIN).tolist()) == {k}
        assert {int(t) % DOMAIN // 1000 for t in tokens} <= valid_docs[k]
    old = build_train_valid_test_datasets(data_path, "80,20,0", (100, 30, 0), 8, 3)
    assert np.array_equal(old[1].dataset_index, datasets.valid.dataset_index)  # the blended set is unchanged
    single = build_datasets([data_path[1]], "80,20,0", (100, 30, 0), 8, 3)
    assert list(single.valid_per_domain) == ["domain0"] and single.valid_per_domain["domain0"] is single.valid


BROADCAST = """
import sys, torch.distributed as dist
from megatron_eff.data.batch_source import broadcast_positions
dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]), world_size=2)
got = broadcast_positions([5, 1, 4] if dist.get_rank() == 1 else [], src=1)
assert got == [5, 1, 4], got
dist.destroy_process_group()
"""


def test_broadcast_positions_on_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BROADCAST, f"tcp://127.0.0.1:{port}", str(r)], env=env)
             for r in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
