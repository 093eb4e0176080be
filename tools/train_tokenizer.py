"""Train a sentencepiece tokenizer model (for ``--tokenizer-type SentencePieceTokenizer``).

    python tools/train_tokenizer.py --input data/jsonl/all.jsonl --json-keys text \\
        --model-prefix data/tokenizer --vocab-size 4096

writes ``data/tokenizer.model`` and ``data/tokenizer.vocab``. Inputs are ``.txt`` files (every non-empty
line is a training sentence) or JSON-lines files (``.jsonl``/``.json``; every non-empty line of each
``--json-keys`` field is a sentence).

Special ids (the LLaMA convention): ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos, used as end of
document) = 2, no pad token (pad id -1). Normalisation is the identity and whitespace is kept as is, so
with ``--byte-fallback`` (the default) ``detokenize(tokenize(text)) == text`` for any text, newlines
included. The same inputs and flags give the same model: ``--input-sentence-size`` sampling is done
here with ``--seed`` (sentencepiece's own sampler is not reproducible), and ``--num-threads`` defaults
to 1, the safe choice for bit-identical models (more threads are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import numpy as np

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1


class InputError(Exception):
    """A bad input file or line; the message names the file (and line)."""


def iter_texts(path: str, json_keys: list[str]) -> Iterator[str]:
    """Texts of one input file: each line of a .txt file, or each ``json_keys`` field of a .jsonl line."""
    is_json = path.endswith((".jsonl", ".json", ".ndjson"))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})"
                ) from None
            if not is_json:
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            for key in json_keys:
                if not isinstance(record, dict) or not isinstance(record.get(key), str):
                    raise InputError(f"{path}:{lineno}: no string field {key!r} (--json-keys)")
                yield record[key]


def iter_sentences(paths: list[str], json_keys: list[str]) -> Iterator[str]:
    """Every non-empty line of every text, in input order."""
    for path in paths:
        for text in iter_texts(path, json_keys):
            for line in text.split("\n"):
                if line.strip():
                    yield line.rstrip("\r")


def sample_sentences(sentences: list[str], size: int, seed: int) -> list[str]:
    """``size`` sentences drawn without replacement by ``seed``, in input order (all if size is 0)."""
    if size <= 0 or len(sentences) <= size:
        return sentences
    keep = np.sort(np.random.RandomState(seed).choice(len(sentences), size=size, replace=False))
    return [sentences[i] for i in keep]


def train(args: argparse.Namespace) -> None:
    """Run the sentencepiece trainer with the flags' settings."""
    import sentencepiece

    sentences = list(iter_sentences(args.input, args.json_keys))  # read all first: input errors surface here
    if not sentences:
        raise InputError(f"--input {' '.join(args.input)}: no text found")
    sentences = sample_sentences(sentences, args.input_sentence_size, args.seed)
    sentencepiece.set_random_generator_seed(args.seed)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage,
        input_sentence_size=0,  # sampled above: sentencepiece's own sampling ignores the seed
        num_threads=args.num_threads,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        minloglevel=0 if args.verbose else 2,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to train on (jsonl)")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode unknown characters as UTF-8 byte tokens (default: on)",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters covered by the vocabulary (default: %(default)s)",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=0,
        help="train on a random sample of this many sentences (0: all)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sentence sampling")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail early, naming the flag, on values sentencepiece would reject obscurely."""
    for path in args.input:
        if not os.path.isfile(path):
            raise InputError(f"--input {path}: file not found")
    if args.vocab_size <= 3 + (256 if args.byte_fallback else 0):
        raise InputError(f"--vocab-size {args.vocab_size}: too small (byte fallback alone needs 259 ids)")
    if not 0 < args.character_coverage <= 1:
        raise InputError(f"--character-coverage {args.character_coverage}: must be in (0, 1]")
    prefix_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    try:  # created like preprocess_data.py's --output-prefix folder
        os.makedirs(prefix_dir, exist_ok=True)
    except OSError as error:
        raise InputError(f"--model-prefix {args.model_prefix}: cannot create folder {prefix_dir} "
                         f"({error.strerror})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        train(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # sentencepiece reports bad settings (e.g. vocab too large) this way
        print(f"error: sentencepiece training failed: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    except OSError as err:  # an input that cannot be read (the message names the file)
        print(f"train_tokenizer.py: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.model_prefix}.model and {args.model_prefix}.vocab "
        f"(vocab {args.vocab_size}, unk={UNK_ID} bos={BOS_ID} eos={EOS_ID}, no pad)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
