"""Turn the shipped corpus (data/corpus/DOMAIN/*.txt) into JSON-lines documents, one file per domain.

Each text file is cut into paragraphs at blank lines; a paragraph longer than ``--doc-chars`` (long
stretches of verse) is cut at line ends. Consecutive pieces are gathered into documents of about
``--doc-chars`` characters (a document ends once it reaches that size), joined by one blank line. Each
line is ``{"text": ..., "source": "DOMAIN/FILE.txt"}``. Files and domains are read in sorted order, so the
output is deterministic.

    python tools/corpus_to_jsonl.py --output-dir data/jsonl --combined data/jsonl/all.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated blocks of ``text``, trailing whitespace removed from each line."""
    blocks, current = [], []
    for line in text.splitlines():
        line = line.rstrip()
        if line:
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def split_long_block(block: str, doc_chars: int) -> list[str]:
    """Cut a paragraph longer than ``doc_chars`` at line ends into pieces of about ``doc_chars``."""
    pieces, current, size = [], [], 0
    for line in block.split("\n"):
        current.append(line)
        size += len(line) + 1
        if size >= doc_chars:
            pieces.append("\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n".join(current))
    return pieces


def chunk_documents(blocks: list[str], doc_chars: int) -> list[str]:
    """Gather paragraphs into documents of at least ``doc_chars`` characters (the last may be shorter)."""
    blocks = [piece for block in blocks for piece in split_long_block(block, doc_chars)]
    documents, current, size = [], [], 0
    for block in blocks:
        current.append(block)
        size += len(block) + 2
        if size >= doc_chars:
            documents.append("\n\n".join(current))
            current, size = [], 0
    if current:
        documents.append("\n\n".join(current))
    return documents


def domain_documents(domain_dir: Path, doc_chars: int) -> list[dict]:
    """All documents of one domain folder, as ``{"text", "source"}`` records."""
    records = []
    for path in sorted(domain_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        source = f"{domain_dir.name}/{path.name}"
        records += [{"text": doc, "source": source} for doc in chunk_documents(paragraphs(text), doc_chars)]
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records one JSON object per line (UTF-8), via a temp file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=REPO_ROOT / "data" / "corpus",
        help="folder holding one sub-folder of .txt files per domain (default: %(default)s)",
    )
    parser.add_argument(
        "--domains", nargs="+", default=None, help="domain sub-folders to convert (default: all, sorted)"
    )
    parser.add_argument("--doc-chars", type=int, default=2000, help="target document size in characters")
    parser.add_argument("--output-dir", type=Path, required=True, help="writes DIR/DOMAIN.jsonl")
    parser.add_argument("--combined", type=Path, default=None, help="also write every document to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.doc_chars <= 0:
        sys.exit(f"error: --doc-chars must be positive, got {args.doc_chars}")
    if not args.corpus_dir.is_dir():
        sys.exit(f"error: --corpus-dir {args.corpus_dir}: not a folder")
    domains = args.domains or sorted(p.name for p in args.corpus_dir.iterdir() if p.is_dir())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    combined = []
    for domain in domains:
        domain_dir = args.corpus_dir / domain
        records = domain_documents(domain_dir, args.doc_chars) if domain_dir.is_dir() else []
        if not records:
            sys.exit(f"error: --domains {domain}: no .txt files in {domain_dir}")
        write_jsonl(args.output_dir / f"{domain}.jsonl", records)
        combined += records
        chars = sum(len(r["text"]) for r in records)
        print(f"{domain}: {len(records)} documents, {chars} characters -> {args.output_dir / domain}.jsonl")
    if args.combined is not None:
        args.combined.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(args.combined, combined)
        print(f"combined: {len(combined)} documents -> {args.combined}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
