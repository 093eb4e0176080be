"""Indexed dataset: round trips, byte layout of the Megatron format, and clear errors on bad files."""

import os
import struct

import numpy as np
import pytest

from megatron_eff.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
)

MAGIC = b"MMIDIDX\x00\x00"


def pack_idx(dtype_code, lengths, pointers, doc_indices, version=1, magic=MAGIC) -> bytes:
    """The .idx bytes written by hand from the documented layout."""
    out = magic + struct.pack("<Q", version) + struct.pack("<B", dtype_code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_indices))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    out += struct.pack(f"<{len(pointers)}q", *pointers)
    out += struct.pack(f"<{len(doc_indices)}q", *doc_indices)
    return out


def build(prefix, documents, dtype):
    """Write ``documents`` (list of token lists) with the builder, one sequence each."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for doc in documents:
        builder.add_item(np.array(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8, np.float32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, 200, size=rng.randint(0, 30)).tolist() for _ in range(25)]
    build(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 25 and ds.num_documents == 25 and ds.dtype == dtype
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], np.array(doc, dtype=dtype))
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    np.testing.assert_array_equal(ds.document_indices, np.arange(26))
    np.testing.assert_array_equal(ds.get(3, offset=2, length=3), np.array(docs[3][2:5], dtype=dtype))


def test_multi_sequence_documents(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    builder.add_document([1, 2, 3, 4, 5], [2, 3])
    builder.add_item([6])
    builder.add_item([7, 8])
    builder.end_document()
    builder.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 4])
    np.testing.assert_array_equal(ds.document_lengths, [5, 3])
    np.testing.assert_array_equal(ds.get_document(0, 1, 3), [2, 3, 4])
    np.testing.assert_array_equal(ds.get_document(1), [6, 7, 8])


def test_reads_hand_packed_files(tmp_path):
    # Two documents: [5, 6, 7] and [65535, 0] as uint16 (code 8).
    (tmp_path / "h.bin").write_bytes(struct.pack("<5H", 5, 6, 7, 65535, 0))
    (tmp_path / "h.idx").write_bytes(pack_idx(8, [3, 2], [0, 6], [0, 1, 2]))
    ds = IndexedDataset(str(tmp_path / "h"))
    assert ds.dtype == np.uint16
    np.testing.assert_array_equal(ds[0], [5, 6, 7])
    np.testing.assert_array_equal(ds[1], [65535, 0])
    np.testing.assert_array_equal(ds.sequence_pointers, [0, 6])


def test_written_bytes_match_format(tmp_path):
    build(tmp_path / "w", [[1, 2, 3], [4], [5, 6]], np.int32)
    expected_idx = pack_idx(4, [3, 1, 2], [0, 12, 16], [0, 1, 2, 3])
    assert (tmp_path / "w.idx").read_bytes() == expected_idx
    assert (tmp_path / "w.bin").read_bytes() == struct.pack("<6i", 1, 2, 3, 4, 5, 6)


def test_best_fitting_dtype():
    assert best_fitting_dtype(32000) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(128256) == np.int32


def write_pair(tmp_path, idx_bytes, bin_bytes):
    (tmp_path / "x.idx").write_bytes(idx_bytes)
    (tmp_path / "x.bin").write_bytes(bin_bytes)
    return str(tmp_path / "x")


GOOD_BIN = struct.pack("<3H", 1, 2, 3)


@pytest.mark.parametrize(
    "idx_bytes, bin_bytes, field",
    [
        (pack_idx(8, [3], [0], [0, 1])[:-4], GOOD_BIN, "document_indices"),
        (pack_idx(8, [3], [0], [0, 1])[:40], GOOD_BIN, "sequence_pointers"),
        (pack_idx(8, [3], [0], [0, 1])[:20], GOOD_BIN, "header"),
        (pack_idx(8, [3], [0], [0, 1], magic=b"TNTIDX\x00\x00\x00"), GOOD_BIN, "magic"),
        (pack_idx(8, [3], [0], [0, 1], version=2), GOOD_BIN, "version"),
        (pack_idx(9, [3], [0], [0, 1]), GOOD_BIN, "dtype code"),
        (pack_idx(8, [3], [0], [0, 1]), GOOD_BIN[:-2], "size"),
        (pack_idx(8, [3], [0], [0, 1]) + b"\x00", GOOD_BIN, "trailing"),
        (pack_idx(8, [3], [0], [0, 2]), GOOD_BIN, "document_indices"),
        (pack_idx(8, [2, 1], [0, 6], [0, 2]), GOOD_BIN, "outside"),
    ],
)
def test_bad_files_raise_naming_file_and_field(tmp_path, idx_bytes, bin_bytes, field):
    prefix = write_pair(tmp_path, idx_bytes, bin_bytes)
    with pytest.raises(ValueError, match=field) as info:
        IndexedDataset(prefix)
    assert "x.idx" in str(info.value) or "x.bin" in str(info.value)


def test_missing_file_names_path(tmp_path):
    (tmp_path / "y.idx").write_bytes(pack_idx(8, [], [], [0]))
    with pytest.raises(FileNotFoundError, match="y.bin"):
        IndexedDataset(str(tmp_path / "y"))


def test_failed_build_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(str(tmp_path / "f.bin"), np.uint16) as builder:
        builder.add_item([1, 2, 3])
        raise RuntimeError("tokenizer crashed")
    assert os.listdir(tmp_path) == []
    builder = IndexedDatasetBuilder(str(tmp_path / "g.bin"), np.uint16)
    builder.add_item([1])
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_unfinalized_builder_writes_nothing_visible(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "p.bin"), np.uint16)
    builder.add_item([1, 2])
    assert not (tmp_path / "p.bin").exists()
    builder.finalize(str(tmp_path / "p.idx"))
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx"]
