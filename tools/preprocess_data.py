"""Tokenize raw documents into Megatron indexed datasets (``PREFIX_KEY_document.bin/.idx``).

    python tools/preprocess_data.py --input data/jsonl/shakespeare.jsonl --json-keys text \\
        --output-prefix data/shakespeare --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/tokenizer.model --append-eod --workers 4

writes ``data/shakespeare_text_document.bin`` and ``.idx`` (one output pair per ``--json-keys`` key), and
beside them ``data/shakespeare_text_document.stats.json``, the largest token id (read by
``megatron_eff.data.indexed_dataset.max_token_id``; not part of the Megatron format).

Inputs (``--input`` takes several files and glob patterns, read in the order given):

- JSON lines (``.jsonl``, ``.json``, ``.ndjson``), the primary format: one document per line, the text in
  each ``--json-keys`` field. Blank lines are ignored.
- plain text (``.txt``): by default the whole file is one document. With ``--txt-doc-separator LINE``,
  documents are separated by lines equal to LINE (surrounding whitespace ignored): ``--txt-doc-separator
  ''`` makes every blank-line-separated paragraph a document, ``--txt-doc-separator '<|endoftext|>'``
  reads the common concatenated-corpus format. Leading/trailing newlines of a document are dropped and
  documents with no text are skipped. A text document counts as ``{"text": ...}``.

Each document becomes one sequence (``tokenize(text)`` plus the eod id with ``--append-eod``). The token
dtype is uint16 when the vocabulary has fewer than 65,500 ids, else int32. A malformed JSON line, a missing
key or non-UTF-8 bytes stop the run with a message naming the file and line (``--skip-bad-lines`` skips
them and reports the count). Outputs are written to temp files and renamed into place only when the whole
input has been processed, so a failed run (a full disk, Ctrl-C, a worker error) leaves no partial or temp
file. An input without any document is an error, as are a full disk and an unreadable input
(``preprocess_data.py: error: ...``, exit status 2). Workers exit with this process, even on ``kill -9``.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import glob
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_eff.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
    remove_dataset,
    stats_file_path,
)
from megatron_eff.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


class InputError(Exception):
    """A bad flag, file or line; the message names it (``error: ...``, exit status 1)."""


class ToolError(Exception):
    """No documents, an unreadable input or output folder (``preprocess_data.py: error: ...``, exit status 2)."""


class RawDocument(NamedTuple):
    """One undecoded document: where it starts and its bytes."""

    path: str
    line: int
    data: bytes
    is_json: bool


class EncodedDocument(NamedTuple):
    """A worker's answer: token ids per key, or an error message for ``path:line``."""

    path: str
    line: int
    tokens: dict[str, np.ndarray] | None  # key -> int32 [n]
    num_bytes: int
    error: str | None


# ----------------------------------------------------------------------------------------------------------
# Reading (main process)
# ----------------------------------------------------------------------------------------------------------


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``--input`` (glob patterns expanded, sorted); InputError for a missing file."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--input {pattern}: no file matches")
        for path in matches:
            if not os.path.isfile(path):
                raise InputError(f"--input {path}: file not found")
            if not path.endswith((*JSON_SUFFIXES, ".txt")):
                raise InputError(f"--input {path}: expected a .jsonl/.json/.ndjson or .txt file")
            check_readable(path)
            paths.append(path)
    return paths


def check_readable(path: str) -> None:
    """ToolError naming ``--input`` if ``path`` cannot be opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise ToolError(f"--input {path}: cannot read ({err.strerror})") from None


def read_json_lines(path: str) -> Iterator[RawDocument]:
    """One document per non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield RawDocument(path, lineno, raw, True)


def read_text_documents(path: str, separator: str | None) -> Iterator[RawDocument]:
    """The whole file, or the blocks between separator lines, as documents (empty ones skipped)."""
    with open(path, "rb") as f:
        if separator is None:
            data = f.read()
            if data.strip():
                yield RawDocument(path, 1, data, False)
            return
        sep = separator.strip().encode("utf-8")
        lines, first = [], 1
        for lineno, raw in enumerate(f, start=1):
            if raw.strip() == sep:
                if b"".join(lines).strip():
                    yield RawDocument(path, first, b"".join(lines), False)
                lines, first = [], lineno + 1
            else:
                lines.append(raw)
        if b"".join(lines).strip():
            yield RawDocument(path, first, b"".join(lines), False)


def read_documents(paths: list[str], separator: str | None) -> Iterator[RawDocument]:
    """Every raw document of every input file, in order."""
    for path in paths:
        if path.endswith(JSON_SUFFIXES):
            yield from read_json_lines(path)
        else:
            yield from read_text_documents(path, separator)


# ----------------------------------------------------------------------------------------------------------
# Encoding (worker processes)
# ----------------------------------------------------------------------------------------------------------


class Encoder:
    """Decode and tokenize documents; ``initialize`` builds the tokenizer once per worker process."""

    def __init__(self, tokenizer_kwargs: dict, json_keys: list[str], append_eod: bool):
        self.tokenizer_kwargs = tokenizer_kwargs
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.tokenizer = None

    def initialize(self) -> None:
        """Build the tokenizer (called in each worker, or once in-process with one worker)."""
        self.tokenizer = build_tokenizer(**self.tokenizer_kwargs)

    def encode(self, doc: RawDocument) -> EncodedDocument:
        """Token ids of every key of ``doc``, or the first problem found."""
        try:
            text = doc.data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = doc.line + doc.data[: err.start].count(b"\n")
            return EncodedDocument(doc.path, line, None, len(doc.data), f"not valid UTF-8 ({err.reason})")
        record, error = self._parse(doc, text)
        tokens = None
        if error is None:
            tokens, error = self._tokenize_keys(record)
        return EncodedDocument(doc.path, doc.line, tokens, len(doc.data), error)

    def _tokenize_keys(self, record: dict) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(key -> int32 [n] token ids, None), or (None, what is wrong with the record)."""
        tokens = {}
        for key in self.json_keys:
            if key not in record:
                return None, f"missing key {key!r} (--json-keys)"
            if not isinstance(record[key], str):
                return None, f"key {key!r} is {type(record[key]).__name__}, expected a string"
            try:
                ids = self.tokenizer.tokenize(record[key])
            except ValueError as err:
                return None, f"cannot tokenize {key!r}: {err}"
            tokens[key] = np.asarray(ids + [self.tokenizer.eod] * self.append_eod, dtype=np.int32)
        return tokens, None

    @staticmethod
    def _parse(doc: RawDocument, text: str) -> tuple[dict, str | None]:
        """The document as a dict (a JSON object, or ``{"text": ...}`` for plain text) and an error."""
        if not doc.is_json:
            return {"text": text.strip("\r\n")}, None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            where = err.msg.removesuffix(" at")  # "Invalid control character at", "... starting at"
            return {}, f"malformed JSON ({where} at column {err.colno})"
        if not isinstance(record, dict):
            return {}, f"expected a JSON object, got {type(record).__name__}"
        return record, None


_WORKER_ENCODER: Encoder | None = None  # set once per worker process by _init_worker


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(encoder: Encoder, parent_pid: int) -> None:
    """Pool initializer: die with the parent, keep this process's encoder, with its own tokenizer."""
    global _WORKER_ENCODER
    exit_with_parent(parent_pid)
    encoder.initialize()
    _WORKER_ENCODER = encoder


def exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as ``parent_pid`` dies, even by ``kill -9`` (which leaves the parent no chance
    to stop its pool): the kernel's parent-death signal on Linux, else a thread polling ``os.getppid()``."""
    if not _set_parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # it died before the signal was armed
        os._exit(1)


def _set_parent_death_signal(signum: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, signum)``; False where there is no such call. The signal comes when the
    *thread* that forked us ends: Pool forks its workers from the main thread, which lives as long as the run."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_when_orphaned(parent_pid: int) -> None:
    """Poll until this process is reparented, then exit."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _encode_in_worker(doc: RawDocument) -> EncodedDocument:
    return _WORKER_ENCODER.encode(doc)


# ----------------------------------------------------------------------------------------------------------
# Writing (main process)
# ----------------------------------------------------------------------------------------------------------


def output_prefix(prefix: str, key: str) -> str:
    """Megatron's naming: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


class Stats:
    """Counters for the progress bar and the summary."""

    def __init__(self):
        self.start = time.time()
        self.docs = self.tokens = self.bytes = self.bad_lines = self.empty_docs = 0

    def summary(self, prefixes: list[str], dtype) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        outputs = ", ".join(f"{p}.{{bin,idx,stats.json}}" for p in prefixes)
        lines = [
            f"processed {self.docs} documents, {self.tokens} tokens, {self.bytes / 1e6:.2f} MB of input "
            f"in {elapsed:.1f} s ({self.docs / elapsed:.0f} docs/s, {self.bytes / 1e6 / elapsed:.2f} MB/s)",
            f"wrote {outputs} (dtype {np.dtype(dtype).name})",
        ]
        if self.empty_docs:
            lines.append(f"{self.empty_docs} documents had no tokens (kept as empty sequences)")
        if self.bad_lines:
            lines.append(f"skipped {self.bad_lines} bad lines (--skip-bad-lines)")
        return "\n".join(lines)


def encoded_stream(args, encoder: Encoder, docs: Iterator[RawDocument], pool) -> Iterator[EncodedDocument]:
    """Encoded documents in input order, from the pool or (one worker) in this process."""
    if pool is None:
        encoder.initialize()
        return map(encoder.encode, docs)
    return pool.imap(_encode_in_worker, docs, chunksize=args.chunk_size)


def write_datasets(args, encoder: Encoder, paths: list[str], dtype, pool) -> Stats:
    """Stream every document into one builder per key; finalize all, or abort all on any error."""
    from tqdm import tqdm

    stats = Stats()
    prefixes = [output_prefix(args.output_prefix, key) for key in args.json_keys]
    builders = [IndexedDatasetBuilder(data_file_path(p), dtype) for p in prefixes]
    total_bytes = sum(os.path.getsize(p) for p in paths)
    bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr, mininterval=1
    )
    pending_bytes = 0
    try:
        for result in encoded_stream(args, encoder, read_documents(paths, args.txt_doc_separator), pool):
            pending_bytes += result.num_bytes
            stats.bytes += result.num_bytes
            if result.error is not None:
                if not args.skip_bad_lines:
                    raise InputError(f"{result.path}:{result.line}: {result.error}")
                stats.bad_lines += 1
                continue
            for builder, key in zip(builders, args.json_keys, strict=True):
                ids = result.tokens[key]
                builder.add_document(ids, [len(ids)])
                stats.tokens += len(ids)
            stats.empty_docs += any(len(ids) == 0 for ids in result.tokens.values())
            stats.docs += 1
            if stats.docs % args.log_interval == 0:
                bar.update(pending_bytes)
                pending_bytes = 0
                bar.set_postfix(docs=stats.docs, docs_per_s=f"{stats.docs / (time.time() - stats.start):.0f}")
        bar.set_postfix(docs=stats.docs, docs_per_s=f"{stats.docs / (time.time() - stats.start):.0f}")
        bar.update(pending_bytes)
        bar.close()
        if stats.docs == 0:
            skipped = f" ({stats.bad_lines} bad lines skipped by --skip-bad-lines)" if stats.bad_lines else ""
            raise ToolError(f"no documents in --input {' '.join(args.input)}{skipped}")
        finalize_all(builders, prefixes)
    except BaseException:
        bar.close()
        for builder in builders:
            builder.abort()
        raise
    print(stats.summary(prefixes, dtype))
    return stats


def finalize_all(builders: list[IndexedDatasetBuilder], prefixes: list[str]) -> None:
    """Move every key's dataset (``.bin``, ``.stats.json``, ``.idx``) into place, or none: a failure removes
    the keys already finalized."""
    done = []
    try:
        for builder, prefix in zip(builders, prefixes, strict=True):
            builder.finalize(index_file_path(prefix), stats_file_path(prefix))
            done.append(prefix)
    except BaseException:
        for prefix in done:
            remove_dataset(prefix)
        raise


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input", nargs="+", required=True, help=".jsonl/.json/.ndjson or .txt files or globs"
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize (one output each)"
    )
    group.add_argument(
        "--txt-doc-separator",
        default=None,
        metavar="LINE",
        help="in .txt inputs, lines equal to LINE separate documents ('' = blank line); "
        "default: each .txt file is one document",
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip malformed/undecodable lines and missing keys instead of stopping",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument(
        "--tokenizer-model", default=None, help="sentencepiece .model, or HF tokenizer.json/folder"
    )
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: ids before the eod id; TikTokenizer: the total (default 131072)")
    group.add_argument("--tiktoken-pattern", default=None, help="TikTokenizer split pattern: v1 or v2 (default)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids reserved for special tokens (default: %(default)s)")
    group.add_argument("--tiktoken-special-tokens", nargs="+", default=None,
                       help="TikTokenizer special tokens (default <unk> <s> </s>)")
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id to each document"
    )
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: %(default)s)")
    group.add_argument("--chunk-size", type=int, default=32, help="documents per task sent to a worker")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress updates")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject bad numeric flags, naming them."""
    for flag in ("workers", "chunk_size", "log_interval"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise InputError(f"--json-keys {' '.join(args.json_keys)}: repeated key")


def make_output_dir(prefix: str) -> None:
    """Create the folder of ``--output-prefix``; ToolError naming the flag when it cannot be."""
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ToolError(f"--output-prefix {prefix}: cannot create folder {folder} ({err.strerror})") from None


def run(args: argparse.Namespace) -> Stats:
    """Validate flags, build the tokenizer and write the datasets."""
    check_args(args)
    paths = expand_inputs(args.input)
    tokenizer_kwargs = {
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_model": args.tokenizer_model,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "vocab_size": args.vocab_size,
        "tiktoken_pattern": args.tiktoken_pattern,
        "tiktoken_num_special_tokens": args.tiktoken_num_special_tokens,
        "tiktoken_special_tokens": args.tiktoken_special_tokens,
    }
    tokenizer = build_tokenizer(**tokenizer_kwargs)  # fails here, once, on a bad flag or file
    if args.append_eod and tokenizer.eod is None:
        raise InputError(f"--append-eod: the {args.tokenizer_type} has no end-of-document token")
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    make_output_dir(args.output_prefix)
    encoder = Encoder(tokenizer_kwargs, args.json_keys, args.append_eod)
    if args.workers == 1:
        return write_datasets(args, encoder, paths, dtype, pool=None)
    with Pool(args.workers, initializer=_init_worker, initargs=(encoder, os.getpid())) as pool:
        return write_datasets(args, encoder, paths, dtype, pool)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ToolError, OSError) as err:
        print(f"preprocess_data.py: error: {failure_message(err, args.output_prefix)}", file=sys.stderr)
        return 2
    return 0


def failure_message(err: Exception, output_prefix: str) -> str:
    """One line for a failed run; a full disk names the output folder (the outputs are already removed)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = os.path.dirname(os.path.abspath(output_prefix))
        return f"no space left on device for {folder} (--output-prefix {output_prefix}); nothing was written"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
