"""GPT dataset indices, caching, document splits, blending and the --data-path/--split parsers."""

import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from megatron_eff.data import indexed_dataset as indexed_module
from megatron_eff.data.blended_dataset import BlendedDataset, build_blending_indices
from megatron_eff.data.builders import (
    build_train_valid_test_datasets,
    collate_samples,
    get_split_indices,
    parse_data_path,
    parse_split,
)
from megatron_eff.data.gpt_dataset import GPTDataset, build_gpt_indices, build_sample_index, count_tokens
from megatron_eff.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def make_prefix(directory, name="corpus", num_docs=40, seed=0, base=0):
    """Documents of random length (some empty) whose tokens are unique: doc d holds base + d*1000 + i."""
    rng = np.random.RandomState(seed)
    prefix = str(directory / name)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for d in range(num_docs):
        length = 0 if d % 13 == 5 else rng.randint(1, 40)
        builder.add_item(base + d * 1000 + np.arange(length))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def stream_of_samples(ds: GPTDataset, count: int) -> np.ndarray:
    """The token stream covered by the first ``count`` unshuffled samples (overlap token dropped)."""
    parts = [ds.sample_tokens(0)] + [ds.sample_tokens(j)[1:] for j in range(1, count)]
    return np.concatenate(parts)


def test_samples_cover_each_epoch_exactly(tmp_path):
    indexed = IndexedDataset(make_prefix(tmp_path))
    documents = np.arange(indexed.num_documents)
    seq_length = 7
    tokens_per_epoch = int(indexed.document_lengths.sum())
    num_samples = 3 * tokens_per_epoch // seq_length  # about three epochs
    ds = GPTDataset(indexed, documents, num_samples, seq_length, seed=3, cache_dir=str(tmp_path / "c"))
    assert ds.sample_index.shape == (num_samples + 1, 2) and ds.sample_index.dtype == np.int64
    assert all(len(ds[i]["tokens"]) == seq_length + 1 for i in range(0, num_samples, 17))
    stream = stream_of_samples(ds, num_samples)
    expected = np.concatenate([indexed.get_document(d) for d in ds.document_index])
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    num_docs = len(documents)
    for epoch in range(2):  # every full epoch is a permutation of the documents: each token exactly once
        epoch_docs = ds.document_index[epoch * num_docs : (epoch + 1) * num_docs]
        assert sorted(epoch_docs.tolist()) == documents.tolist()
        epoch_tokens = stream[epoch * tokens_per_epoch : (epoch + 1) * tokens_per_epoch]
        np.testing.assert_array_equal(
            np.sort(epoch_tokens), np.sort(np.concatenate([indexed.get_document(d) for d in documents]))
        )
    assert sorted(ds.shuffle_index.tolist()) == list(range(num_samples))


def unchunked_gpt_indices(document_ids, doc_lengths, num_samples, seq_length, seed):
    """The index builder as it was before it was made chunked and in place: the output must not change."""
    tokens_per_epoch = int(doc_lengths[document_ids].sum())
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = np.concatenate([rng.permutation(document_ids) for _ in range(num_epochs)]).astype(np.int64)
    token_starts = np.zeros(len(document_index) + 1, dtype=np.int64)
    np.cumsum(doc_lengths[document_index], out=token_starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    assert positions[-1] < token_starts[-1]
    doc_positions = np.searchsorted(token_starts, positions, side="right") - 1
    offsets = positions - token_starts[doc_positions]
    sample_index = np.stack([doc_positions, offsets], axis=1).astype(np.int64)
    shuffle_index = rng.permutation(num_samples).astype(np.int64)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


@pytest.mark.parametrize(
    "num_docs, pick, num_samples, seq_length, seed",
    [
        (40, "all", 1, 1, 0),
        (40, "all", 50, 8, 1),
        (40, "all", 400, 7, 3),  # several epochs
        (100, "every_third", 333, 5, 4),  # a subset of the documents
        (100, "shuffled", 200, 16, 5),  # ids in any order
        (7, "all", 30, 64, 6),  # samples longer than the documents
    ],
)
def test_indices_match_the_unchunked_builder(tmp_path, num_docs, pick, num_samples, seq_length, seed):
    indexed = IndexedDataset(make_prefix(tmp_path, num_docs=num_docs, seed=seed))
    ids = np.arange(num_docs, dtype=np.int64)
    ids = {"all": ids, "every_third": ids[::3], "shuffled": np.random.RandomState(9).permutation(ids)}[pick]
    lengths = indexed.document_lengths
    expected = unchunked_gpt_indices(ids, lengths, num_samples, seq_length, seed)
    got = build_gpt_indices(ids, lengths, count_tokens(lengths, ids), num_samples, seq_length, seed)
    for name, array in expected.items():
        assert got[name].dtype == np.int64
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    for chunk_size in (1, 2, 3, 7, 64):  # chunk boundaries anywhere, also inside runs of empty documents
        np.testing.assert_array_equal(
            build_sample_index(got["document_index"], lengths, seq_length, num_samples, chunk_size),
            expected["sample_index"],
        )
    assert count_tokens(lengths, ids, chunk_size=3) == int(lengths[ids].sum())


def test_sample_index_needs_enough_tokens():
    lengths = np.array([3, 0, 4])
    index = build_sample_index(np.array([0, 1, 2]), lengths, 2, 3)  # 7 tokens: samples of 2 (+1) fit 3 times
    assert index.tolist() == [[0, 0], [0, 2], [2, 1], [2, 3]]
    with pytest.raises(ValueError, match="document index has 7 tokens, 9 needed"):
        build_sample_index(np.array([0, 1, 2]), lengths, 2, 4, chunk_size=2)


def test_document_lengths_of_multi_sequence_documents(tmp_path, monkeypatch):
    prefix = str(tmp_path / "multi")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    rng = np.random.RandomState(0)
    for d in range(30):
        for _ in range(d % 4):  # 0 to 3 sequences; 0 makes an empty document
            builder.add_item(np.arange(rng.randint(0, 9)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    monkeypatch.setattr(indexed_module, "CHUNK", 4)
    indexed = IndexedDataset(prefix)
    token_starts = np.concatenate([[0], np.cumsum(indexed.sequence_lengths, dtype=np.int64)])
    np.testing.assert_array_equal(indexed.document_lengths, np.diff(token_starts[indexed.document_indices]))
    assert indexed.document_lengths is indexed.document_lengths  # computed once
    assert [len(indexed.get_document(d)) for d in range(30)] == indexed.document_lengths.tolist()


def test_seed_determinism(tmp_path):
    indexed = IndexedDataset(make_prefix(tmp_path))
    docs = np.arange(indexed.num_documents)
    a = GPTDataset(indexed, docs, 50, 8, seed=1, cache_dir=str(tmp_path / "a"))
    b = GPTDataset(indexed, docs, 50, 8, seed=1, cache_dir=str(tmp_path / "b"))
    c = GPTDataset(indexed, docs, 50, 8, seed=2, cache_dir=str(tmp_path / "c"))
    assert not b.loaded_from_cache
    np.testing.assert_array_equal(a[10]["tokens"], b[10]["tokens"])
    assert not np.array_equal(a.document_index, c.document_index)
    assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))


def test_cache_created_and_reused(tmp_path):
    indexed = IndexedDataset(make_prefix(tmp_path))
    docs = np.arange(indexed.num_documents)
    first = GPTDataset(indexed, docs, 30, 8, seed=1)  # default cache: PREFIX's folder / cache
    cache_dir = tmp_path / "cache"
    files = sorted(f for f in os.listdir(cache_dir) if not f.endswith(".lock"))  # a lock file per cache
    assert len(files) == 4 and any(f.endswith("description.json") for f in files)
    assert not first.loaded_from_cache
    second = GPTDataset(indexed, docs, 30, 8, seed=1)
    assert second.loaded_from_cache
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    third = GPTDataset(indexed, docs, 30, 9, seed=1)
    assert not third.loaded_from_cache
    assert len(os.listdir(cache_dir)) == 10
    assert not any(".tmp" in f for f in os.listdir(cache_dir))


def write_documents(prefix, lengths, base):
    """Documents of the given lengths whose tokens are base + d * 1000 + i."""
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for d, length in enumerate(lengths):
        builder.add_item(base + d * 1000 + np.arange(length))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_regenerated_data_at_the_same_prefix_gets_new_indices(tmp_path):
    """Same prefix, document count and token total, other lengths: the old cache must not be reused."""
    prefix = str(tmp_path / "corpus")
    lengths = np.arange(1, 41)
    write_documents(prefix, lengths, base=0)
    first = GPTDataset(IndexedDataset(prefix), np.arange(40), 60, 8, seed=2)
    write_documents(prefix, np.random.RandomState(0).permutation(lengths), base=10**6)  # regenerated
    indexed = IndexedDataset(prefix)
    second = GPTDataset(indexed, np.arange(40), 60, 8, seed=2)
    unchanged = ("path_prefix", "split", "documents", "tokens_per_epoch", "num_samples", "seq_length", "seed")
    assert all(first.description[k] == second.description[k] for k in unchanged)  # the old cache key
    assert not second.loaded_from_cache
    assert not np.array_equal(first.sample_index, second.sample_index)
    stream = stream_of_samples(second, 60)  # the samples cut from the new documents, in index order
    expected = np.concatenate([indexed.get_document(d) for d in second.document_index])
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert all(second[i]["tokens"].min() >= 10**6 for i in range(60))
    assert GPTDataset(IndexedDataset(prefix), np.arange(40), 60, 8, seed=2).loaded_from_cache


def _build_in_a_race(prefix, cache_dir, marker, barrier, results):
    """One of the racing processes: count builds in ``marker``, then send back what the dataset holds."""
    import megatron_eff.data.gpt_dataset as gpt_dataset_module

    real_build = gpt_dataset_module.build_gpt_indices

    def counted_build(*args):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to reach the lock while this one builds
        return real_build(*args)

    gpt_dataset_module.build_gpt_indices = counted_build
    indexed = IndexedDataset(prefix)
    barrier.wait()
    ds = GPTDataset(indexed, np.arange(indexed.num_documents), 300, 8, seed=4, cache_dir=cache_dir)
    names = ("document_index", "sample_index", "shuffle_index")
    results.put((ds.loaded_from_cache, [np.asarray(getattr(ds, n)).tobytes() for n in names]))


def test_ranks_racing_on_an_empty_cache_build_once(tmp_path):
    prefix = make_prefix(tmp_path)
    cache_dir, marker = str(tmp_path / "cache"), str(tmp_path / "builds.txt")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_build_in_a_race, args=(prefix, cache_dir, marker, barrier, results)) for _ in range(2)
    ]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    with open(marker) as f:
        assert len(f.read().split()) == 1  # one build
    assert sorted(loaded for loaded, _ in outcomes) == [False, True]  # the other process loaded its files
    assert outcomes[0][1] == outcomes[1][1]


def test_unwritable_cache_dir_builds_in_memory(tmp_path):
    indexed = IndexedDataset(make_prefix(tmp_path))
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match="could not cache dataset indices"):
        ds = GPTDataset(indexed, np.arange(indexed.num_documents), 30, 8, 1, str(tmp_path / "a_file" / "cache"))
    assert not ds.loaded_from_cache and len(ds[3]["tokens"]) == 9


def test_empty_split_raises(tmp_path):
    prefix = make_prefix(tmp_path)
    indexed = IndexedDataset(prefix)
    with pytest.raises(ValueError, match="corpus.*valid.*no documents"):
        GPTDataset(indexed, np.array([], dtype=np.int64), 10, 8, 1, str(tmp_path), "valid")
    with pytest.raises(ValueError, match="0 tokens"):
        GPTDataset(indexed, np.array([5]), 10, 8, 1, str(tmp_path), "test")  # doc 5 is empty
    with pytest.raises(ValueError, match="--split: the valid split of .*corpus gets no documents"):
        build_train_valid_test_datasets([prefix], "98,1,1", (10, 10, 0), 8, 1)  # 1% of 40 docs rounds to 0


def test_train_valid_test_splits_share_no_documents(tmp_path):
    prefix = make_prefix(tmp_path, num_docs=100)
    train, valid, test = build_train_valid_test_datasets([prefix], "80,20,0", (200, 30, 0), 8, 1234)
    assert test is None
    assert set(train.document_ids.tolist()).isdisjoint(valid.document_ids.tolist())
    assert len(train.document_ids) == 80 and len(valid.document_ids) == 20
    # Token values encode the document (doc * 1000 + i), so check the samples themselves too.
    train_docs = {int(t) // 1000 for i in range(len(train)) for t in train[i]["tokens"]}
    valid_docs = {int(t) // 1000 for i in range(len(valid)) for t in valid[i]["tokens"]}
    assert train_docs.isdisjoint(valid_docs)


def test_split_indices_match_megatron_rounding():
    assert get_split_indices(parse_split("949,50,1"), 1000) == [0, 949, 999, 1000]
    # Thirds of 10 round to 3 each; Megatron shifts every boundary by the shortfall: [0, 4, 7, 10].
    assert get_split_indices(parse_split("1,1,1"), 10) == [0, 4, 7, 10]
    assert get_split_indices(parse_split("1,0,0"), 7) == [0, 7, 7, 7]


def test_blended_proportions(tmp_path):
    prefixes = [make_prefix(tmp_path, f"p{k}", seed=k, base=k * 1_000_000) for k in range(3)]
    data_path = ["0.5", prefixes[0], "0.3", prefixes[1], "0.2", prefixes[2]]
    train, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (2000, 0, 0), 8, 1234)
    assert isinstance(train, BlendedDataset) and len(train) == 2000
    counts = np.bincount(train.dataset_index, minlength=3) / 2000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.01)
    sample = train[7]
    assert sample["tokens"][0] // 1_000_000 == sample["dataset_id"]
    again, _, _ = build_train_valid_test_datasets(data_path, "1,0,0", (2000, 0, 0), 8, 1234)
    assert again.loaded_from_cache
    np.testing.assert_array_equal(again.dataset_index, train.dataset_index)


def test_blending_is_greedy_and_reweightable():
    index, sample_index = build_blending_indices([0.75, 0.25], 8)
    assert index.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    assert sample_index.tolist() == [0, 0, 1, 2, 3, 1, 4, 5]

    class Tiny:
        def __init__(self, k):
            self.k = k

        def __len__(self):
            return 1000

        def __getitem__(self, i):
            return {"tokens": np.array([self.k, i])}

    blend = BlendedDataset([Tiny(0), Tiny(1)], [0.5, 0.5], 400)
    before = blend.dataset_index[:200].copy()
    blend.set_weights([0.9, 0.1], from_sample=200)
    np.testing.assert_array_equal(blend.dataset_index[:200], before)
    tail = np.bincount(blend.dataset_index[200:], minlength=2) / 200
    np.testing.assert_allclose(tail, [0.9, 0.1], atol=0.01)
    # Per-dataset sample indices continue without repeats across the change.
    for k in range(2):
        drawn = blend.dataset_sample_index[blend.dataset_index == k]
        assert drawn.tolist() == list(range(len(drawn)))
    with pytest.raises(ValueError, match="non-negative"):
        blend.set_weights([-1, 2], 10)
    with pytest.raises(ValueError, match="positive sum"):
        BlendedDataset([Tiny(0)], [0.0], 10)


def test_collate_shifts_labels():
    batch = collate_samples([{"tokens": np.arange(5)}, {"tokens": np.arange(10, 15)}])
    assert batch["tokens"].shape == (2, 4) and batch["tokens"].dtype.is_floating_point is False
    assert batch["tokens"][1].tolist() == [10, 11, 12, 13]
    assert batch["labels"][1].tolist() == [11, 12, 13, 14]
    assert batch["dataset_id"].tolist() == [0, 0]  # a single dataset is domain 0
    assert batch["loss_mask"].dtype == torch.float32 and batch["loss_mask"].shape == (2, 4)
    assert bool((batch["loss_mask"] == 1).all())
    masked = collate_samples([{"tokens": np.arange(3), "loss_mask": [1, 0], "dataset_id": 2}])
    assert masked["loss_mask"].tolist() == [[1.0, 0.0]] and masked["dataset_id"].tolist() == [2]


def test_parse_data_path(tmp_path):
    a, b = make_prefix(tmp_path, "a"), make_prefix(tmp_path, "b", num_docs=20)
    assert parse_data_path([a]) == ([a], [1.0])
    prefixes, weights = parse_data_path(["3", a, "1", b])
    assert prefixes == [a, b] and weights == [0.75, 0.25]
    prefixes, weights = parse_data_path([a, b])  # unweighted: by token count
    assert prefixes == [a, b] and weights[0] > weights[1] and abs(sum(weights) - 1) < 1e-12
    with pytest.raises(ValueError, match="--data-path.*not a mix"):
        parse_data_path(["0.5", a, b])
    with pytest.raises(ValueError, match="--data-path.*pairs"):
        parse_data_path(["0.5", a, "0.5"])
    with pytest.raises(ValueError, match="--data-path.*non-negative"):
        parse_data_path(["-1", a, "2", b])
    with pytest.raises(ValueError, match="--data-path.*positive sum"):
        parse_data_path(["0", a, "0", b])
    with pytest.raises(FileNotFoundError, match="--data-path.*missing"):
        parse_data_path([str(tmp_path / "missing")])


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0", "nan,1"])
def test_parse_split_errors(bad):
    with pytest.raises(ValueError, match="--split"):
        parse_split(bad)


def test_parse_split_values():
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split("90/10") == pytest.approx([0.9, 0.1, 0.0])


def test_num_workers_read_the_same_micro_batches(tmp_path):
    """--num-workers: a DataLoader reads this rank's micro-batches in the order of the in-process reader, from
    the start and from a resumed position (consumed samples), with the blend's dataset ids."""
    from megatron_eff.data.samplers import micro_batches

    prefixes = [make_prefix(tmp_path, f"p{k}", seed=k, base=k * 1_000_000) for k in range(2)]
    train, _, _ = build_train_valid_test_datasets(["0.6", prefixes[0], "0.4", prefixes[1]], "1,0,0", (96, 0, 0), 8, 3)
    for consumed in (0, 36):  # 36: resumed after 3 iterations of a global batch of 12
        for dp_rank in range(2):
            in_process = list(micro_batches(train, consumed, 3, dp_rank, 2))
            workers = list(micro_batches(train, consumed, 3, dp_rank, 2, num_workers=2))
            assert len(workers) == len(in_process) == (96 - consumed) // 6
            for a, b in zip(in_process, workers):
                assert a.keys() == b.keys() == {"tokens", "labels", "dataset_id", "loss_mask"}
                assert all(torch.equal(a[key], b[key]) for key in a)
    first = next(micro_batches(train, 36, 3, 1, 2, num_workers=2))  # samples 39..41: rank 1's slice
    assert torch.equal(first["tokens"], collate_samples([train[i] for i in (39, 40, 41)])["tokens"])


def test_lazy_weight_segments_match_an_eager_rebuild(monkeypatch):
    """Weight changes at any point (also before earlier ones, and at 0), read in any order, give the arrays of
    rebuilding the whole tail at each change; a replayed schedule gives them again."""
    from megatron_eff.data import blended_dataset as blended_module

    monkeypatch.setattr(blended_module, "MIN_SEGMENT_BUILD", 4)  # lazy segments grow many times

    class Tiny:
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            return {"tokens": np.array([i, i])}

    size = 3000
    blend = BlendedDataset([Tiny(), Tiny(), Tiny()], [0.5, 0.3, 0.2], size)
    index, sample_index = build_blending_indices(blend.weights, size)
    changes = [(500, [1, 1, 8]), (700, [1, 0, 0]), (650, [3, 3, 4]), (2000, [0, 0, 1]), (0, [2, 2, 6]), (5, [1, 2, 3])]
    for from_sample, weights in changes:
        for i in range(0, size, 97):  # materialise some of each segment first
            blend.locate(i)
        blend.set_weights(weights, from_sample)
        counts = np.bincount(index[:from_sample], minlength=3)
        tail = build_blending_indices(blended_module.normalize_weights(weights, 3), size - from_sample, counts)
        index = np.concatenate([index[:from_sample], tail[0]])
        sample_index = np.concatenate([sample_index[:from_sample], tail[1]])
        np.testing.assert_array_equal(blend.dataset_index, index)
        np.testing.assert_array_equal(blend.dataset_sample_index, sample_index)
    for earlier in ([], [(10, [1, 1, 1])], [(0, [1, 0, 0])]):
        again = BlendedDataset([Tiny(), Tiny(), Tiny()], [0.5, 0.3, 0.2], size)
        for from_sample, weights in earlier:
            again.set_weights(weights, from_sample)
        again.set_weight_schedule(blend.weight_schedule)
        assert again.weight_schedule == blend.weight_schedule
        np.testing.assert_array_equal(again.dataset_index, index)
