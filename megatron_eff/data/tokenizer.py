"""Tokenizers behind one interface, chosen by Megatron's ``--tokenizer-type``.

- ``SentencePieceTokenizer``: ``--tokenizer-model X.model``; eod is the model's eos id (``</s>``).
- ``HuggingFaceTokenizer``: ``--tokenizer-model`` a ``tokenizer.json`` or a folder holding one; eod is the
  ``eos_token`` of ``tokenizer_config.json`` beside it, else the first of ``</s>``, ``<|endoftext|>``, ...
- ``GPT2BPETokenizer``: ``--vocab-file vocab.json --merge-file merges.txt``; eod is ``<|endoftext|>``.
- ``NullTokenizer``: ``--vocab-size N``; text is space-separated ids below N.
- ``TikTokenizer`` (Megatron-LM's): ``--tokenizer-model vocab.json`` (a list of ``{"rank", "token_bytes"
  (base64), "token_str"}``), ``--tiktoken-pattern v1|v2``, ``--tiktoken-num-special-tokens`` (default 1000) and
  ``--tiktoken-special-tokens`` (default ``<unk> <s> </s>``), ``--vocab-size`` the total (default 2^17): ids
  below the special-token count are the special tokens (filled up with ``<SPECIAL_i>``), the byte-level BPE
  ranks follow them; eod is ``</s>``. Needs the ``tiktoken`` package.

``NullTokenizer`` follows Megatron: ``--vocab-size N`` counts the ids *before* the end-of-document token,
so ids 0..N-1 are text, ``eod == N`` and ``vocab_size == N + 1``.

Every tokenizer exposes ``vocab_size`` (unpadded), ``tokenize``, ``detokenize``, ``eod``, ``bos`` and
``pad`` (``bos``/``pad``/``eod`` are None where the vocabulary has no such token).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(ABC):
    """Common interface of every tokenizer type."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before padding to a multiple)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eod added)."""

    @abstractmethod
    def detokenize(self, ids) -> str:
        """Text of a sequence of ids."""

    @property
    def eod(self) -> int | None:
        """End-of-document id appended after each document by the preprocessor."""
        return None

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence id, or None."""
        return None

    @property
    def pad(self) -> int | None:
        """Padding id, or None."""
        return None


def _require_file(path: str | None, flag: str, tokenizer_type: str) -> str:
    """Return ``path`` if it names an existing file; otherwise raise naming the flag."""
    if not path:
        raise ValueError(f"{flag} is required for --tokenizer-type {tokenizer_type}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: file not found")
    return path


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model``; eod is the model's eos id (``</s>``)."""

    def __init__(self, model_file: str):
        import sentencepiece

        self.model_file = model_file
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def eod(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def bos(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def pad(self) -> int | None:
        return _optional_id(self._sp.pad_id())


def _optional_id(token_id: int) -> int | None:
    """Sentencepiece reports a disabled special token as -1."""
    return None if token_id < 0 else int(token_id)


class _TokenizersLibraryTokenizer(Tokenizer):
    """Shared code of the tokenizers-library based types; subclasses set ``_tok`` and the special ids."""

    _tok = None
    _eod: int | None = None
    _bos: int | None = None
    _pad: int | None = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def eod(self) -> int | None:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int | None:
        return self._pad

    def _first_known(self, candidates) -> int | None:
        """Id of the first candidate token present in the vocabulary."""
        for token in candidates:
            if token and self._tok.token_to_id(token) is not None:
                return self._tok.token_to_id(token)
        return None


class HuggingFaceTokenizer(_TokenizersLibraryTokenizer):
    """A ``tokenizer.json`` (or a folder holding one) loaded with the ``tokenizers`` library.

    Special tokens come from ``tokenizer_config.json`` beside it when present (``eos_token``, ``bos_token``,
    ``pad_token``), else from the usual names (``</s>``, ``<|endoftext|>``, ``<s>``, ``<pad>``, ...).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"--tokenizer-model {path}: no tokenizer.json found")
        self.path = json_path
        self._tok = HFTokenizer.from_file(json_path)
        config = _read_tokenizer_config(os.path.dirname(json_path))
        self._eod = self._first_known((_token_text(config.get("eos_token")), *EOS_CANDIDATES))
        self._bos = self._first_known((_token_text(config.get("bos_token")), *BOS_CANDIDATES))
        self._pad = self._first_known((_token_text(config.get("pad_token")), *PAD_CANDIDATES))


def _read_tokenizer_config(directory: str) -> dict:
    """``tokenizer_config.json`` of a HF folder, or {} when absent."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as err:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not a tokenizer_config.json ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a tokenizer_config.json (expected a JSON object)")
    return config


def _token_text(entry) -> str | None:
    """A special-token entry of tokenizer_config.json is a string or ``{"content": ...}``."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


class GPT2BPETokenizer(_TokenizersLibraryTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; eod (and bos) is ``<|endoftext|>``."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        self._tok = ByteLevelBPETokenizer(vocab_file, merge_file, add_prefix_space=False)
        self._eod = self._tok.token_to_id("<|endoftext|>")
        if self._eod is None:
            raise ValueError(f"--vocab-file {vocab_file}: no <|endoftext|> token (needed as end-of-document)")
        self._bos = self._eod


class NullTokenizer(Tokenizer):
    """Text is space-separated integer ids; ``--vocab-size N`` gives ids 0..N-1 plus eod = N (Megatron)."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError(f"--vocab-size must be a positive integer for NullTokenizer, got {vocab_size}")
        self._num_text_ids = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._num_text_ids + 1

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(tok) for tok in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer expects space-separated integers, got {text[:50]!r}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"NullTokenizer: id {bad[0]} outside [0, {self.vocab_size})")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def eod(self) -> int:
        return self._num_text_ids


# Megatron-LM's TikTokenizer split patterns (--tiktoken-pattern v1 / v2)
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
          r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+",
}
TIKTOKEN_REQUIRED_SPECIALS = ("<unk>", "<s>", "</s>")


def read_tiktoken_ranks(path: str, max_vocab: int) -> dict[bytes, int]:
    """The byte-level BPE ranks of a Megatron TikTokenizer vocabulary file (its first `max_vocab` entries);
    ValueError naming the file and entry for anything else."""
    import base64

    where = f"--tokenizer-model {path}"
    if not path.endswith(".json"):
        raise ValueError(f"{where}: a TikTokenizer vocabulary is a .json file")
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not JSON ({err})") from None
    if not isinstance(vocab, list):
        raise ValueError(f"{where}: expected a list of {{rank, token_bytes, token_str}} entries")
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:max_vocab]):
        if not isinstance(entry, dict) or entry.keys() != {"rank", "token_bytes", "token_str"} or entry["rank"] != i:
            raise ValueError(f"{where}: entry {i} is not {{\"rank\": {i}, \"token_bytes\", \"token_str\"}}")
        token = base64.b64decode(entry["token_bytes"])
        if i < 256 and token != bytes([i]):
            raise ValueError(f"{where}: entry {i} must be the single byte {i} (the first 256 ranks are bytes)")
        if token in ranks:
            raise ValueError(f"{where}: entry {i} repeats the bytes of entry {ranks[token]}")
        ranks[token] = i
    return ranks


class TikTokenizer(Tokenizer):
    """Megatron-LM's CustomTikTokenizer (see the module docstring for the id layout)."""

    def __init__(self, path: str, pattern: str = "v2", vocab_size: int | None = None,
                 num_special_tokens: int = 1000, special_tokens: list[str] | None = None):
        import tiktoken

        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern {pattern!r}: use one of {', '.join(TIKTOKEN_PATTERNS)}")
        self._vocab_size = vocab_size or 2**17
        specials = list(special_tokens or TIKTOKEN_REQUIRED_SPECIALS)
        if len(set(specials)) != len(specials) or not set(TIKTOKEN_REQUIRED_SPECIALS) <= set(specials):
            raise ValueError(f"--tiktoken-special-tokens {' '.join(specials)}: must be unique and include "
                             f"{' '.join(TIKTOKEN_REQUIRED_SPECIALS)}")
        if not len(specials) <= num_special_tokens < self._vocab_size:
            raise ValueError(f"--tiktoken-num-special-tokens {num_special_tokens} must be at least the "
                             f"{len(specials)} special tokens and below --vocab-size {self._vocab_size}")
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special_tokens)]
        ranks = read_tiktoken_ranks(path, self._vocab_size - num_special_tokens)
        if len(ranks) + num_special_tokens != self._vocab_size:
            raise ValueError(f"--tokenizer-model {path}: {len(ranks)} BPE ranks + {num_special_tokens} special "
                             f"tokens != --vocab-size {self._vocab_size}")
        self._specials = {token: i for i, token in enumerate(specials)}
        self._model = tiktoken.Encoding(
            name=os.path.basename(os.path.dirname(os.path.abspath(path))) or "tiktoken",
            pat_str=TIKTOKEN_PATTERNS[pattern],
            mergeable_ranks={token: i + num_special_tokens for token, i in ranks.items()},
            special_tokens=self._specials,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._model.encode_ordinary(text)  # special-token text is encoded as ordinary bytes (Megatron)

    def detokenize(self, ids) -> str:
        return self._model.decode([int(i) for i in ids])

    @property
    def eod(self) -> int:
        return self._specials["</s>"]

    @property
    def bos(self) -> int:
        return self._specials["<s>"]

    @property
    def pad(self) -> int | None:
        return self._specials.get("<pad>")


TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer",
                   "TikTokenizer")


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    tiktoken_pattern: str | None = None,
    tiktoken_num_special_tokens: int = 1000,
    tiktoken_special_tokens: list[str] | None = None,
) -> Tokenizer:
    """Build the tokenizer named by ``--tokenizer-type`` from the files its flags name. A missing file is a
    FileNotFoundError, a file the tokenizer library cannot read a ValueError, both naming the flag and file."""
    if tokenizer_type == "SentencePieceTokenizer":
        path = _require_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        return _load(f"--tokenizer-model {path}", tokenizer_type, SentencePieceTokenizer, path)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError(f"--tokenizer-model is required for --tokenizer-type {tokenizer_type}")
        if not os.path.exists(tokenizer_model):
            raise FileNotFoundError(f"--tokenizer-model {tokenizer_model}: file or folder not found")
        return _load(f"--tokenizer-model {tokenizer_model}", tokenizer_type, HuggingFaceTokenizer, tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _require_file(vocab_file, "--vocab-file", tokenizer_type)
        merges = _require_file(merge_file, "--merge-file", tokenizer_type)
        return _load(f"--vocab-file {vocab} / --merge-file {merges}", tokenizer_type, GPT2BPETokenizer, vocab, merges)
    if tokenizer_type == "TikTokenizer":
        path = _require_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        return _load(f"--tokenizer-model {path}", tokenizer_type, TikTokenizer, path, tiktoken_pattern or "v2",
                     vocab_size, tiktoken_num_special_tokens, tiktoken_special_tokens)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError(f"--vocab-size is required for --tokenizer-type {tokenizer_type}")
        return NullTokenizer(vocab_size)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


def _load(files: str, tokenizer_type: str, cls, *args) -> Tokenizer:
    """``cls(*args)``; what the tokenizer library raises on a file it cannot parse (sentencepiece a RuntimeError,
    tokenizers a bare Exception) becomes one ValueError naming ``files`` and the tokenizer type."""
    try:
        return cls(*args)
    except (ValueError, OSError, ImportError):  # ours name the flag already; a missing library stays itself
        raise
    except Exception as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{files}: not a {tokenizer_type} file ({reason})") from None


def checkpoint_tokenizer(flags: dict, run_data: dict, model_vocab_size: int) -> Tokenizer:
    """The tokenizer the tools (generate, evaluate) use with a checkpoint: the ``--tokenizer-type``,
    ``--tokenizer-model``, ``--vocab-file``, ``--merge-file`` given in ``flags`` (None where not given), else the
    run's (``run_data``: meta.json's data config, ignored once ``--tokenizer-type`` is given). A NullTokenizer
    covers the model's vocabulary of V ids (before padding): eod = V - 1, as training's ``--vocab-size V - 1``."""
    data = {} if flags.get("tokenizer_type") else run_data
    pick = lambda name: flags.get(name) or data.get(name)  # noqa: E731
    kind = pick("tokenizer_type") or "NullTokenizer"
    tiktoken = {name: pick(name) for name in ("tiktoken_pattern", "tiktoken_special_tokens")}
    tiktoken["tiktoken_num_special_tokens"] = pick("tiktoken_num_special_tokens") or 1000
    return build_tokenizer(kind, tokenizer_model=pick("tokenizer_model"), vocab_file=pick("vocab_file"),
                           merge_file=pick("merge_file"),
                           vocab_size=model_vocab_size if kind == "TikTokenizer" else model_vocab_size - 1,
                           **tiktoken)
