"""Megatron-LM byte-compatible memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

The ``.bin`` file is the concatenation of every sequence's token ids. The ``.idx`` file, all little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    <Q        version (1)
    <B        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q        number of sequences S
    <Q        number of document-index entries D (= documents + 1)
    int32[S]  sequence lengths in tokens
    int64[S]  sequence byte offsets into .bin
    int64[D]  document indices: sequence index where each document starts (leading 0, last = S)

Files written by Megatron-LM load here unchanged and ours load there. Reading never copies the token file:
both files are memory-mapped, and a malformed pair raises one error naming the file and the field.
Writing is atomic: ``IndexedDatasetBuilder`` writes temp files in the target directory and renames them
into place in ``finalize``; ``abort`` (or leaving its ``with`` block by an exception) removes them.

``max_token_id(prefix)`` gives a dataset's largest token id cheaply: from a ``PREFIX.stats.json`` sidecar
(written beside the pair by ``tools/preprocess_data.py``, outside the Megatron format: the pair stays
byte-identical) when its recorded sizes and mtimes match the files, else by one chunked scan of the ``.bin``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import tempfile

import numpy as np

from megatron_eff.files import umask_mode

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
CHUNK = 1 << 18  # entries per step when validating or deriving per-document arrays (bounded temporaries)


def best_fitting_dtype(vocab_size: int | None) -> type[np.generic]:
    """Token dtype for a vocabulary, Megatron's rule: uint16 below 65,500 ids, int32 otherwise."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(path_prefix: str) -> str:
    """``PREFIX.bin``."""
    return f"{path_prefix}.bin"


def index_file_path(path_prefix: str) -> str:
    """``PREFIX.idx``."""
    return f"{path_prefix}.idx"


def dtype_code(dtype) -> int:
    """The ``.idx`` dtype code of a numpy dtype; ValueError for a dtype the format cannot store."""
    try:
        return CODE_OF_DTYPE[np.dtype(dtype)]
    except KeyError:
        supported = ", ".join(str(np.dtype(d)) for d in DTYPE_CODES.values())
        raise ValueError(f"indexed dataset dtype {np.dtype(dtype)} is not one of {supported}") from None


def _existing_pair(path_prefix: str) -> tuple[str, str]:
    """(``PREFIX.idx``, ``PREFIX.bin``); FileNotFoundError naming the first one missing."""
    idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"indexed dataset file not found: {path}")
    return idx_path, bin_path


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


class _Index:
    """The parsed, validated ``.idx`` file: arrays are zero-copy views of a read-only memmap."""

    def __init__(self, idx_path: str):
        self.path = idx_path
        file_size = os.path.getsize(idx_path)
        self._mmap = np.memmap(idx_path, mode="r", dtype=np.uint8) if file_size else np.zeros(0, np.uint8)
        header = bytes(self._mmap[:HEADER_SIZE])
        self.dtype, num_sequences, num_doc_entries = self._parse_header(header)
        self.sequence_lengths = self._field("sequence_lengths", HEADER_SIZE, np.int32, num_sequences)
        offset = HEADER_SIZE + 4 * num_sequences
        self.sequence_pointers = self._field("sequence_pointers", offset, np.int64, num_sequences)
        offset += 8 * num_sequences
        self.document_indices = self._field("document_indices", offset, np.int64, num_doc_entries)
        offset += 8 * num_doc_entries
        if file_size != offset:
            raise ValueError(
                f"{idx_path}: {file_size - offset} unexpected trailing bytes after document_indices "
                f"(header says {num_sequences} sequences, {num_doc_entries} document-index entries)"
            )
        self._check_document_indices(num_sequences)

    def _parse_header(self, header: bytes) -> tuple[type[np.generic], int, int]:
        """Validate magic, version and dtype code; return (dtype, S, D)."""
        if len(header) < len(MAGIC) or header[: len(MAGIC)] != MAGIC:
            raise ValueError(
                f"{self.path}: bad magic {header[: len(MAGIC)]!r}, expected {MAGIC!r} "
                "(not a Megatron mmap indexed dataset index)"
            )
        if len(header) < HEADER_SIZE:
            raise ValueError(f"{self.path}: truncated header ({len(header)} of {HEADER_SIZE} bytes)")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != VERSION:
            raise ValueError(f"{self.path}: unsupported version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise ValueError(f"{self.path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        num_sequences, num_doc_entries = struct.unpack_from("<QQ", header, 18)
        return DTYPE_CODES[code], num_sequences, num_doc_entries

    def _field(self, name: str, offset: int, dtype, count: int) -> np.ndarray:
        """``count`` elements at byte ``offset``; ValueError naming ``name`` if the file is too short."""
        itemsize = np.dtype(dtype).itemsize
        end = offset + count * itemsize
        if end > self._mmap.size:
            raise ValueError(
                f"{self.path}: truncated {name}: header says {count} entries ({count * itemsize} bytes "
                f"from byte {offset}) but the file has {self._mmap.size} bytes"
            )
        return self._mmap[offset:end].view(np.dtype(dtype).newbyteorder("<"))

    def _check_document_indices(self, num_sequences: int) -> None:
        """Document indices must start at 0, never decrease and end at the sequence count."""
        docs = self.document_indices
        if docs.size == 0 or docs[0] != 0 or docs[-1] != num_sequences or np.any(docs[1:] < docs[:-1]):
            first_last = (int(docs[0]), int(docs[-1])) if docs.size else None
            raise ValueError(
                f"{self.path}: invalid document_indices (first, last) = {first_last}: expected a "
                f"non-decreasing list from 0 to the sequence count {num_sequences}"
            )


class _FileBytes:
    """The bytes of a file, sliced like a uint8 array but read with `os.pread` (no mmap, no shared offset:
    safe in forked data-loader workers)."""

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size
        self._fd: int | None = None
        self._pid: int | None = None

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("only contiguous byte ranges can be read")
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, max(stop - start, 0), start)
        if len(data) != max(stop - start, 0):
            raise OSError(f"{self.path}: short read of bytes [{start}, {stop}) (file changed while reading?)")
        return np.frombuffer(data, dtype=np.uint8)

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx``; ``dataset[i]`` is sequence ``i``'s token ids."""

    def __init__(self, path_prefix: str, mmap: bool = True):
        """`mmap=False` (Megatron's `--no-mmap-bin-files`): the .bin is read with one `pread` per access
        instead of being memory-mapped (for file systems where mmap is slow or unsupported)."""
        self.path_prefix = str(path_prefix)
        idx_path, bin_path = _existing_pair(self.path_prefix)
        self._index = _Index(idx_path)
        self._bin_path = bin_path
        self._check_bin_size()
        bin_size = os.path.getsize(bin_path)
        if not bin_size:
            self._bin = np.zeros(0, np.uint8)
        elif mmap:
            self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8)
        else:
            self._bin = _FileBytes(bin_path, bin_size)

    def _check_bin_size(self) -> None:
        """The .bin size must equal sum(lengths) * itemsize and every sequence must lie inside it."""
        itemsize = np.dtype(self.dtype).itemsize
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        expected = int(lengths.sum(dtype=np.int64)) * itemsize
        actual = os.path.getsize(self._bin_path)
        if actual != expected:
            raise ValueError(
                f"{self._bin_path}: size {actual} bytes does not match sequence_lengths in "
                f"{self._index.path} ({expected} bytes = {expected // itemsize} tokens x {itemsize})"
            )
        for begin in range(0, len(lengths), CHUNK):  # in chunks: no int64 copies of all lengths
            chunk_lengths = lengths[begin : begin + CHUNK].astype(np.int64)
            chunk_pointers = pointers[begin : begin + CHUNK]
            if (
                np.any(chunk_lengths < 0)
                or np.any(chunk_pointers < 0)
                or np.any(chunk_pointers + chunk_lengths * itemsize > actual)
            ):
                raise ValueError(
                    f"{self._index.path}: sequence_pointers/sequence_lengths point outside {self._bin_path}"
                )

    @property
    def dtype(self) -> type[np.generic]:
        """Token dtype stored in the .bin file."""
        return self._index.dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 [S] tokens per sequence."""
        return self._index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 [S] byte offset of each sequence in the .bin file."""
        return self._index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [docs + 1] sequence index where each document starts (leading 0, last = S)."""
        return self._index.document_indices

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(document_indices) - 1``)."""
        return len(self.document_indices) - 1

    @functools.cached_property
    def document_lengths(self) -> np.ndarray:
        """int64 [docs] tokens per document (the sum of its sequences' lengths); computed once, read-only."""
        lengths = document_lengths(self.sequence_lengths, self.document_indices)
        lengths.flags.writeable = False
        return lengths

    @functools.cached_property
    def fingerprint(self) -> dict:
        """What identifies the data: md5 of ``document_lengths`` and the ``.bin`` size in bytes.

        Index caches are keyed on it, so data regenerated at the same prefix never reuses stale indices.
        """
        return {
            "document_lengths_md5": hashlib.md5(self.document_lengths).hexdigest(),
            "bin_bytes": int(self._bin.size),
        }

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` as a read-only view (no copy)."""
        num = len(self)
        if not -num <= idx < num:
            raise IndexError(f"sequence index {idx} out of range for {num} sequences in {self.path_prefix}")
        idx = int(idx) % num
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"slice [{offset}, {offset + length}) outside sequence {idx} of length {seq_len}"
            )
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self.sequence_pointers[idx]) + offset * itemsize
        return self._bin[start : start + length * itemsize].view(self.dtype)

    def get_document(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``doc``, its sequences taken back to back."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if last - first == 1:  # the usual case: one sequence per document, a zero-copy view
            return self.get(first, offset, length)
        parts = [self.get(i) for i in range(first, last)]
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        end = len(tokens) if length is None else offset + length
        if offset < 0 or end > len(tokens) or end < offset:
            raise IndexError(f"slice [{offset}, {end}) outside document {doc} of length {len(tokens)}")
        return tokens[offset:end]


def document_lengths(sequence_lengths: np.ndarray, document_indices: np.ndarray) -> np.ndarray:
    """int64 [docs] tokens per document from the ``.idx`` arrays, ``CHUNK`` documents at a time.

    Temporaries are the cumulative lengths of one chunk's sequences, not of all sequences.
    """
    num_docs = len(document_indices) - 1
    lengths = np.empty(num_docs, dtype=np.int64)
    for begin in range(0, num_docs, CHUNK):
        bounds = document_indices[begin : begin + CHUNK + 1]  # [c + 1] first sequence of each document
        first, last = int(bounds[0]), int(bounds[-1])
        token_starts = np.zeros(last - first + 1, dtype=np.int64)  # first token of each sequence, from `first`
        np.cumsum(sequence_lengths[first:last], dtype=np.int64, out=token_starts[1:])
        starts = token_starts[bounds - first]  # [c + 1] first token of each document
        np.subtract(starts[1:], starts[:-1], out=lengths[begin : begin + len(bounds) - 1])
    return lengths


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def encode_index(dtype, sequence_lengths, document_indices) -> bytes:
    """The full ``.idx`` byte string for the given lengths and document indices (pointers derived)."""
    lengths = np.asarray(sequence_lengths, dtype="<i4")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype="<i8")  # byte offset of each sequence
    if len(lengths):
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype="<i8")
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code(dtype))
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs))
    return header + lengths.tobytes() + pointers.tobytes() + docs.tobytes()


def _temp_path_beside(path: str, suffix: str = ".tmp") -> str:
    """Create an empty temp file next to ``path`` (same directory, so a rename is atomic), with the mode a
    plain ``open`` would give it: mkstemp's 0600 would survive the rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, umask_mode(0o666))
    finally:
        os.close(fd)
    return tmp


def _write_temp_beside(path: str, data: bytes) -> str:
    """A temp file next to ``path`` holding ``data``; removed again if the write fails (e.g. a full disk)."""
    tmp = _temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


class IndexedDatasetBuilder:
    """Write an indexed dataset: ``add_item``/``end_document`` or ``add_document``, then ``finalize``.

    Tokens stream into a temp file beside ``bin_path``; ``finalize(idx_path)`` writes the index to a temp
    file and renames both into place (the ``.idx`` last, so its presence means the pair is complete).
    Used as a context manager, an exception inside the block calls ``abort`` and leaves no files behind.
    A document still open at ``finalize`` is closed automatically.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        dtype_code(dtype)  # validate early
        self.bin_path = str(bin_path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._tmp_bin = _temp_path_beside(self.bin_path)
        self._file = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed in finalize/abort
        self._sequence_lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self._max_token_id = -1
        self._closed = False

    def _write_tokens(self, array: np.ndarray) -> None:
        """Append ``array`` to the token file in the dataset's dtype, keeping track of the largest id."""
        tokens = array.astype(self.dtype, copy=False)
        self._file.write(tokens.tobytes(order="C"))
        if tokens.size:
            self._max_token_id = max(self._max_token_id, int(tokens.max()))

    def add_item(self, tokens) -> None:
        """Append one sequence (1-D array-like of token ids)."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"add_item expects a 1-D sequence of token ids, got shape {array.shape}")
        self._write_tokens(array)
        self._sequence_lengths.append(len(array))

    def end_document(self) -> None:
        """Close the current document (a document may hold several sequences)."""
        self._document_indices.append(len(self._sequence_lengths))

    def add_document(self, tokens, lengths) -> None:
        """Append a document: flat ``tokens`` split into sequences of ``lengths``, then close it."""
        array = np.asarray(tokens)
        lengths = [int(n) for n in lengths]
        if array.ndim != 1 or sum(lengths) != len(array):
            raise ValueError(f"add_document: lengths sum {sum(lengths)} != {array.size} tokens")
        self._write_tokens(array)
        self._sequence_lengths.extend(lengths)
        self.end_document()

    def finalize(self, idx_path: str, stats_path: str | None = None) -> None:
        """Write the index and move ``.bin``, the ``stats_path`` sidecar (written only when given, see
        ``max_token_id``) and ``.idx`` into place, in that order. On any error, a full disk included, nothing
        of this dataset is left: neither temp files nor the files already moved."""
        if self._document_indices[-1] != len(self._sequence_lengths):
            self.end_document()
        written, moved = [], []
        try:
            self._file.close()
            tmp_idx = _write_temp_beside(
                str(idx_path), encode_index(self.dtype, self._sequence_lengths, self._document_indices)
            )
            written.append(tmp_idx)
            moves = [(self._tmp_bin, self.bin_path)]
            if stats_path is not None:
                key = _files_key(self._tmp_bin, tmp_idx)  # a rename keeps sizes and mtimes
                written.append(_write_temp_beside(stats_path, _stats_bytes(self._max_token_id, key)))
                moves.append((written[-1], stats_path))
            for tmp, final in [*moves, (tmp_idx, str(idx_path))]:
                os.replace(tmp, final)
                moved.append(final)
        except BaseException:
            for path in written + moved:
                _remove_quietly(path)
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written so far; no output file is created. Never raises: on a full disk the
        final flush fails too, and what it would have written is being discarded anyway."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(OSError):
                self._file.close()
        finally:
            _remove_quietly(self._tmp_bin)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


def remove_dataset(path_prefix: str) -> None:
    """Delete ``PREFIX.idx``, ``PREFIX.stats.json`` and ``PREFIX.bin`` where they exist (the index first, so
    an interrupted removal leaves no pair that looks complete)."""
    for path in (index_file_path(path_prefix), stats_file_path(path_prefix), data_file_path(path_prefix)):
        _remove_quietly(path)


def _remove_quietly(path: str) -> None:
    """Delete ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# ----------------------------------------------------------------------------------------------------------
# Largest token id (the PREFIX.stats.json sidecar)
# ----------------------------------------------------------------------------------------------------------

SCAN_CHUNK_TOKENS = 1 << 24  # tokens per step of the scan: memory stays bounded on any dataset size


def stats_file_path(path_prefix: str) -> str:
    """``PREFIX.stats.json``: the largest token id of ``PREFIX.bin``, keyed by the pair's sizes and mtimes."""
    return f"{path_prefix}.stats.json"


def max_token_id(path_prefix: str) -> int:
    """Largest token id in ``PREFIX.bin`` (-1 when it holds no tokens), e.g. to check a dataset against a
    vocabulary before training. Read from the ``PREFIX.stats.json`` sidecar (written by
    ``tools/preprocess_data.py``) when it describes the current files, i.e. records the sizes and mtimes of
    this ``.bin`` and ``.idx``. Otherwise the memory-mapped ``.bin`` is scanned in chunks and the result saved
    as the sidecar when the folder is writable, so a regenerated dataset is scanned again, once."""
    prefix = str(path_prefix)
    idx_path, bin_path = _existing_pair(prefix)
    key = _files_key(bin_path, idx_path)  # before the scan: a dataset rewritten meanwhile stays stale
    cached = _cached_max_token_id(stats_file_path(prefix), key)
    if cached is not None:
        return cached
    largest = _scan_max_token_id(IndexedDataset(prefix))
    with contextlib.suppress(OSError):  # a read-only folder: scan again next time
        _replace_with_temp(stats_file_path(prefix), _stats_bytes(largest, key))
    return largest


def _files_key(bin_path: str, idx_path: str) -> dict:
    """Sizes and mtimes (ns) of a ``.bin``/``.idx`` pair: what a sidecar must match to describe them."""
    key = {}
    for name, path in (("bin", bin_path), ("idx", idx_path)):
        stat = os.stat(path)
        key[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return key


def _stats_bytes(largest: int, key: dict) -> bytes:
    """The sidecar's content: ``{"max_token_id": N, "bin": {size, mtime_ns}, "idx": {size, mtime_ns}}``."""
    return (json.dumps({"max_token_id": largest, **key}) + "\n").encode("utf-8")


def _cached_max_token_id(stats_path: str, key: dict) -> int | None:
    """The sidecar's max_token_id if it describes the files of ``key``; None if absent, stale or unreadable."""
    try:
        with open(stats_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(name) != key[name] for name in key):
        return None
    value = record.get("max_token_id")
    return value if isinstance(value, int) else None


def _scan_max_token_id(dataset: IndexedDataset) -> int:
    """Largest id in the dataset's ``.bin``, read in chunks of ``SCAN_CHUNK_TOKENS`` tokens."""
    tokens = dataset._bin.view(dataset.dtype)  # [N] every token, memory-mapped
    largest = -1
    for start in range(0, len(tokens), SCAN_CHUNK_TOKENS):
        largest = max(largest, int(tokens[start : start + SCAN_CHUNK_TOKENS].max()))
    return largest


def _replace_with_temp(path: str, data: bytes) -> None:
    """Write ``path`` atomically: a temp file beside it renamed over it."""
    tmp = _write_temp_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
