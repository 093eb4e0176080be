"""Megatron-style GPT dataset: fixed-length samples cut from a stream of shuffled documents.

Three index arrays, built once with numpy from the seed and the split, then cached as ``.npy``:

- document index ``int64 [epochs * docs]``: the split's document ids, each epoch a fresh permutation drawn
  from ``np.random.RandomState(seed)``, epochs concatenated (one epoch holds every document exactly once;
  Megatron shuffles all epochs together instead, which lets a document repeat within an "epoch"). Each
  epoch is shuffled in place in its slice of the output.
- sample index ``int64 [num_samples + 1, 2]``: row ``j`` is (position in the document index, token offset)
  where sample ``j`` starts. Sample ``j`` runs from row ``j`` to row ``j + 1`` *inclusive*, so it has
  ``seq_length + 1`` tokens (inputs + shifted labels), may span documents, and consecutive samples share
  exactly one token, as in Megatron. Built in chunks of the document index (cumulative token counts of
  one chunk at a time), so no array as long as the document index exists besides the output.
- shuffle index ``int64 [num_samples]``: a permutation of the samples.

Peak memory while building is the three outputs plus chunk temporaries of ~10 MB (besides the document
lengths and ids the caller holds), so 10^8 documents fit. The arrays are value for value those of the
earlier unchunked builder, and int64 as before (Megatron's int32 would halve them but change the files).

Cache files live in ``cache_dir`` (default: a ``cache/`` folder beside the data prefix) named
``{md5}-GPTDataset-{name}.npy`` where ``md5`` hashes a JSON description of everything the indices depend
on: the prefix, the documents, the split and sizes, and the data itself (an md5 of the document lengths,
which are all the indices depend on, and the ``.bin`` size), so data regenerated at the same prefix never
reuses stale indices. The description is stored beside them. Each file is written to a temp name and
``os.replace``-d, so a reader never sees half a file, and a cache is built under a file lock, once per node
(or once per job on a shared file system with working ``flock``), not once per rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable

import numpy as np

from megatron_eff.data.indexed_dataset import IndexedDataset

INDEX_FORMAT_VERSION = 1  # bump when the way indices are built changes, to invalidate old caches
INDEX_CHUNK = 1 << 18  # document-index entries per step of the chunked builders (2 MB per int64 temporary)


def description_hash(description: dict) -> str:
    """md5 of the canonical JSON of ``description``."""
    return hashlib.md5(json.dumps(description, sort_keys=True).encode("utf-8")).hexdigest()


def _save_atomic(path: str, write: Callable) -> None:
    """Write a file through ``write(fileobj)`` to a temp name beside ``path``, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_cached(paths: dict[str, str]) -> dict[str, np.ndarray] | None:
    """The cached arrays (memory-mapped), or None unless every file exists."""
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    return {name: np.load(p, mmap_mode="r") for name, p in paths.items()}


def load_or_build_cached(
    cache_dir: str | None, description: dict, build: Callable[[], dict[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], bool]:
    """Load the arrays named by ``build()`` from ``cache_dir`` when cached, else build (and cache) them.

    Returns (arrays, loaded_from_cache). Files: ``{md5}-{class}-{array name}.npy`` and
    ``{md5}-{class}-description.json``; the description must contain ``"class"`` and ``"arrays"``
    (the array names). A miss builds under an exclusive ``flock`` on ``{md5}-{class}.lock``: of the
    processes sharing the cache folder (the ranks of a node, or of every node on a shared file system) the
    first builds and writes, the others wait and then load its files. An unwritable ``cache_dir`` gives a
    warning and arrays built in memory.
    """
    if cache_dir is None:
        return build(), False
    stem = f"{description_hash(description)}-{description['class']}"
    paths = {name: os.path.join(cache_dir, f"{stem}-{name}.npy") for name in description["arrays"]}
    arrays = _load_cached(paths)
    if arrays is not None:
        return arrays, True
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = open(os.path.join(cache_dir, f"{stem}.lock"), "ab")  # noqa: SIM115 - closed by `with` below
    except OSError as err:
        warnings.warn(f"could not cache dataset indices in {cache_dir}: {err}", stacklevel=2)
        return build(), False
    with lock:
        with contextlib.suppress(OSError):  # a file system without locks: every process builds, as before
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        arrays = _load_cached(paths)  # written by the process that held the lock before
        if arrays is not None:
            return arrays, True
        arrays = build()
        try:
            for name, path in paths.items():
                _save_atomic(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
            text = json.dumps(description, sort_keys=True, indent=4).encode("utf-8")
            _save_atomic(os.path.join(cache_dir, f"{stem}-description.json"), lambda f: f.write(text))
        except OSError as err:
            warnings.warn(f"could not cache dataset indices in {cache_dir}: {err}", stacklevel=2)
    return arrays, False


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """int64 [num_epochs * len(documents)]: each epoch a permutation of ``documents``.

    Each epoch is shuffled in place in its slice of the output: ``rng.shuffle`` draws exactly what
    ``rng.permutation`` draws, without a list of per-epoch copies to concatenate.
    """
    num = len(documents)
    document_index = np.empty(num_epochs * num, dtype=np.int64)
    for epoch in range(num_epochs):
        epoch_documents = document_index[epoch * num : (epoch + 1) * num]
        epoch_documents[:] = documents
        rng.shuffle(epoch_documents)
    return document_index


def build_sample_index(
    document_index: np.ndarray,
    document_lengths: np.ndarray,
    seq_length: int,
    num_samples: int,
    chunk_size: int = INDEX_CHUNK,
) -> np.ndarray:
    """int64 [num_samples + 1, 2] (document-index position, offset) where each sample starts.

    ``document_lengths`` [all docs] are token counts by document id. Sample ``j`` starts at token
    ``j * seq_length`` of the concatenation of the document index's documents and ends (inclusive) where
    sample ``j + 1`` starts. Walks the document index ``chunk_size`` entries at a time.
    """
    sample_index = np.empty((num_samples + 1, 2), dtype=np.int64)
    next_sample, tokens_before = 0, 0  # first sample not yet placed; tokens before the chunk
    for begin in range(0, len(document_index), chunk_size):
        lengths = document_lengths[document_index[begin : begin + chunk_size]]  # [c]
        token_starts = np.empty(len(lengths) + 1, dtype=np.int64)  # [c + 1] first token of each entry
        token_starts[0] = tokens_before
        np.cumsum(lengths, dtype=np.int64, out=token_starts[1:])
        token_starts[1:] += tokens_before
        tokens_before = int(token_starts[-1])
        end_sample = min(num_samples + 1, -(-tokens_before // seq_length))  # samples starting in this chunk
        if end_sample > next_sample:
            positions = np.arange(next_sample, end_sample, dtype=np.int64) * seq_length
            entries = np.searchsorted(token_starts, positions, side="right") - 1  # skips empty documents
            sample_index[next_sample:end_sample, 1] = positions - token_starts[entries]
            sample_index[next_sample:end_sample, 0] = entries + begin
            next_sample = end_sample
        if next_sample == num_samples + 1:
            return sample_index
    raise ValueError(f"document index has {tokens_before} tokens, {num_samples * seq_length + 1} needed")


def count_tokens(document_lengths: np.ndarray, document_ids: np.ndarray, chunk_size: int = INDEX_CHUNK) -> int:
    """Total length of the documents ``document_ids`` (gathered a chunk at a time)."""
    return sum(
        int(document_lengths[document_ids[k : k + chunk_size]].sum(dtype=np.int64))
        for k in range(0, len(document_ids), chunk_size)
    )


def build_gpt_indices(
    document_ids: np.ndarray,
    document_lengths: np.ndarray,
    tokens_per_epoch: int,
    num_samples: int,
    seq_length: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Document, sample and shuffle indices (see the module docstring) from the seed.

    ``document_lengths`` [all docs] are token counts by document id; ``tokens_per_epoch`` is
    ``count_tokens(document_lengths, document_ids)``.
    """
    tokens_needed = num_samples * seq_length + 1  # consecutive samples share one token
    num_epochs = -(-tokens_needed // tokens_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(document_ids, num_epochs, rng)
    sample_index = build_sample_index(document_index, document_lengths, seq_length, num_samples)
    shuffle_index = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(shuffle_index)  # the draws of rng.permutation(num_samples)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


class GPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` tokens from the documents ``document_ids``.

    ``dataset[i]`` is ``{"tokens": int64 [seq_length + 1]}``; the model trains on ``tokens[:-1]`` to
    predict ``tokens[1:]``.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        document_ids: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
        name: str = "train",
    ):
        self.indexed_dataset = indexed_dataset
        self.name = name
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        prefix = indexed_dataset.path_prefix
        self._doc_lengths = indexed_dataset.document_lengths  # int64 [all docs]
        tokens_per_epoch = self._validate(prefix)
        self.cache_dir = (
            cache_dir
            if cache_dir is not None
            else os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
        )
        self.description = {
            "class": type(self).__name__,
            "arrays": ["document_index", "sample_index", "shuffle_index"],
            "path_prefix": os.path.abspath(prefix),
            "data": indexed_dataset.fingerprint,  # regenerated data at the same prefix gets new indices
            "split": name,
            "documents": {
                "count": len(self.document_ids),
                "first": int(self.document_ids[0]),
                "last": int(self.document_ids[-1]),
                "md5": hashlib.md5(np.ascontiguousarray(self.document_ids)).hexdigest(),
            },
            "tokens_per_epoch": tokens_per_epoch,
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
            "index_format_version": INDEX_FORMAT_VERSION,
        }
        arrays, self.loaded_from_cache = load_or_build_cached(
            self.cache_dir, self.description, lambda: self._build_indices(tokens_per_epoch)
        )
        self.document_index = arrays["document_index"]  # int64 [epochs * docs]
        self.sample_index = arrays["sample_index"]  # int64 [num_samples + 1, 2]
        self.shuffle_index = arrays["shuffle_index"]  # int64 [num_samples]

    def _validate(self, prefix: str) -> int:
        """Check the arguments; return the split's token count."""
        if self.num_samples < 1 or self.seq_length < 1:
            raise ValueError(
                f"{prefix} split '{self.name}': num_samples ({self.num_samples}) and seq_length "
                f"({self.seq_length}) must be positive"
            )
        if len(self.document_ids) == 0:
            raise ValueError(f"{prefix} split '{self.name}' has no documents")
        num_docs = len(self._doc_lengths)
        if self.document_ids.min() < 0 or self.document_ids.max() >= num_docs:
            raise ValueError(f"{prefix} split '{self.name}': document ids outside [0, {num_docs})")
        tokens = count_tokens(self._doc_lengths, self.document_ids)
        if tokens == 0:
            raise ValueError(
                f"{prefix} split '{self.name}' has {len(self.document_ids)} documents but 0 tokens"
            )
        return tokens

    def _build_indices(self, tokens_per_epoch: int) -> dict[str, np.ndarray]:
        """Document, sample and shuffle indices from the seed."""
        return build_gpt_indices(
            self.document_ids, self._doc_lengths, tokens_per_epoch, self.num_samples, self.seq_length, self.seed
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples ({self.name})")
        return {"tokens": self.sample_tokens(int(self.shuffle_index[i]))}

    def sample_tokens(self, j: int) -> np.ndarray:
        """int64 [seq_length + 1] tokens of the *unshuffled* sample ``j``."""
        (doc_begin, offset_begin), (doc_end, offset_end) = self.sample_index[j], self.sample_index[j + 1]
        get, docs = self.indexed_dataset.get_document, self.document_index
        if doc_begin == doc_end:
            parts = [get(docs[doc_begin], offset_begin, offset_end - offset_begin + 1)]
        else:
            parts = [get(docs[doc_begin], offset_begin)]
            parts += [get(docs[k]) for k in range(doc_begin + 1, doc_end)]
            parts.append(get(docs[doc_end], 0, offset_end + 1))
        return np.concatenate(parts).astype(np.int64)
