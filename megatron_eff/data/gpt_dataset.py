"""Megatron-style GPT dataset: fixed-length samples cut from a stream of shuffled documents.

Three index arrays, built once with numpy from the seed and the split, then cached as ``.npy``:

- document index ``int64 [epochs * docs]``: the split's document ids, each epoch a fresh permutation drawn
  from ``np.random.RandomState(seed)``, epochs concatenated (one epoch holds every document exactly once;
  Megatron shuffles all epochs together instead, which lets a document repeat within an "epoch").
- sample index ``int64 [num_samples + 1, 2]``: row ``j`` is (position in the document index, token offset)
  where sample ``j`` starts. Sample ``j`` runs from row ``j`` to row ``j + 1`` *inclusive*, so it has
  ``seq_length + 1`` tokens (inputs + shifted labels), may span documents, and consecutive samples share
  exactly one token, as in Megatron.
- shuffle index ``int64 [num_samples]``: a permutation of the samples.

Cache files live in ``cache_dir`` (default: a ``cache/`` folder beside the data prefix) named
``{md5}-GPTDataset-{name}.npy`` where ``md5`` hashes a JSON description of everything the indices depend
on; the description is stored beside them. Each file is written to a temp name and ``os.replace``-d, so
ranks building the same cache at once are safe and a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable

import numpy as np

from megatron_eff.data.indexed_dataset import IndexedDataset

INDEX_FORMAT_VERSION = 1  # bump when the way indices are built changes, to invalidate old caches


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


def load_or_build_cached(
    cache_dir: str | None, description: dict, build: Callable[[], dict[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], bool]:
    """Load the arrays named by ``build()`` from ``cache_dir`` when cached, else build (and cache) them.

    Returns (arrays, loaded_from_cache). Files: ``{md5}-{class}-{array name}.npy`` and
    ``{md5}-{class}-description.json``; the description must contain ``"class"`` and ``"arrays"``
    (the array names).
    """
    stem = f"{description_hash(description)}-{description['class']}"
    names = description["arrays"]
    if cache_dir is not None:
        paths = {name: os.path.join(cache_dir, f"{stem}-{name}.npy") for name in names}
        if all(os.path.isfile(p) for p in paths.values()):
            return {name: np.load(p, mmap_mode="r") for name, p in paths.items()}, True
    arrays = build()
    if cache_dir is not None:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            for name, path in paths.items():
                _save_atomic(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
            text = json.dumps(description, sort_keys=True, indent=4).encode("utf-8")
            _save_atomic(os.path.join(cache_dir, f"{stem}-description.json"), lambda f: f.write(text))
        except OSError as err:
            warnings.warn(f"could not cache dataset indices in {cache_dir}: {err}", stacklevel=2)
    return arrays, False


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """int64 [num_epochs * len(documents)]: each epoch a permutation of ``documents``."""
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)


def build_sample_index(doc_lengths: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """int64 [num_samples + 1, 2] (document-index position, offset) where each sample starts.

    ``doc_lengths`` [n] are the token counts of the document index's entries, in order. Sample ``j`` starts at
    token ``j * seq_length`` of their concatenation and ends (inclusive) where sample ``j + 1`` starts.
    """
    token_starts = np.zeros(len(doc_lengths) + 1, dtype=np.int64)  # [n + 1] first token of each entry
    np.cumsum(doc_lengths, out=token_starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # [num_samples + 1]
    if positions[-1] >= token_starts[-1]:
        raise ValueError(f"document index has {token_starts[-1]} tokens, {positions[-1] + 1} needed")
    doc_positions = np.searchsorted(token_starts, positions, side="right") - 1  # skips empty documents
    offsets = positions - token_starts[doc_positions]
    return np.stack([doc_positions, offsets], axis=1).astype(np.int64)


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
            "split": name,
            "documents": {
                "count": len(self.document_ids),
                "first": int(self.document_ids[0]),
                "last": int(self.document_ids[-1]),
                "md5": hashlib.md5(self.document_ids.tobytes()).hexdigest(),
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
        tokens = int(self._doc_lengths[self.document_ids].sum())
        if tokens == 0:
            raise ValueError(
                f"{prefix} split '{self.name}' has {len(self.document_ids)} documents but 0 tokens"
            )
        return tokens

    def _build_indices(self, tokens_per_epoch: int) -> dict[str, np.ndarray]:
        """Document, sample and shuffle indices from the seed."""
        tokens_needed = self.num_samples * self.seq_length + 1  # consecutive samples share one token
        num_epochs = -(-tokens_needed // tokens_per_epoch)
        rng = np.random.RandomState(self.seed)
        document_index = build_document_index(self.document_ids, num_epochs, rng)
        sample_index = build_sample_index(
            self._doc_lengths[document_index], self.seq_length, self.num_samples
        )
        shuffle_index = rng.permutation(self.num_samples).astype(np.int64)
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": shuffle_index,
        }

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
