"""Tokenizers and the data tools, run as a user runs them: corpus -> jsonl -> tokenizer -> .bin/.idx."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_eff.data.indexed_dataset import IndexedDataset
from megatron_eff.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]


def run_tool(name, *args, cwd=None, check=True):
    """Run ``python tools/NAME.py ARGS``; return the CompletedProcess."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The shipped corpus as jsonl, plus a small sentencepiece model trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    run_tool("corpus_to_jsonl.py", "--output-dir", root / "jsonl", "--combined", root / "jsonl" / "all.jsonl")
    run_tool(
        "train_tokenizer.py",
        "--input",
        root / "jsonl" / "all.jsonl",
        "--json-keys",
        "text",
        "--model-prefix",
        root / "tok",
        "--vocab-size",
        600,
        "--input-sentence-size",
        20000,
    )
    return root


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def preprocess_args(corpus, inputs, out_prefix, *extra):
    return [
        "--input",
        *inputs,
        "--output-prefix",
        out_prefix,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        corpus / "tok.model",
        *extra,
    ]


def test_corpus_to_jsonl_domains(corpus):
    names = sorted(os.listdir(corpus / "jsonl"))
    assert names == ["all.jsonl", "britannica.jsonl", "milton.jsonl", "shakespeare.jsonl"]
    milton = read_jsonl(corpus / "jsonl" / "milton.jsonl")
    assert len(milton) > 100 and all(d["source"].startswith("milton/") for d in milton)
    assert np.median([len(d["text"]) for d in milton]) < 4000
    total = sum(
        len(read_jsonl(corpus / "jsonl" / f"{d}.jsonl")) for d in ("britannica", "milton", "shakespeare")
    )
    assert len(read_jsonl(corpus / "jsonl" / "all.jsonl")) == total


def test_sentencepiece_model_special_ids_and_round_trip(corpus):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(corpus / "tok.model"))
    assert tok.vocab_size == 600 and (tok.eod, tok.bos, tok.pad) == (2, 1, None)
    text = read_jsonl(corpus / "jsonl" / "milton.jsonl")[0]["text"] + "\n  Ünïcødé ✓ 123"
    assert tok.detokenize(tok.tokenize(text)) == text


def test_train_tokenizer_is_reproducible(corpus, tmp_path):
    """Same seed, same model; the --model-prefix folder does not exist yet and is created."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        run_tool(
            "train_tokenizer.py",
            "--input",
            corpus / "jsonl" / "britannica.jsonl",
            "--model-prefix",
            "new/dir/t",
            "--vocab-size",
            400,
            "--model-type",
            "unigram",
            "--seed",
            7,
            "--input-sentence-size",
            2000,  # sampled with --seed
            cwd=tmp_path / sub,
        )
    model = ("new", "dir", "t.model")
    assert (tmp_path.joinpath("a", *model)).read_bytes() == (tmp_path.joinpath("b", *model)).read_bytes()


def test_preprocess_matches_tokenizer(corpus, tmp_path):
    source = corpus / "jsonl" / "milton.jsonl"
    result = run_tool(
        "preprocess_data.py",
        *preprocess_args(
            corpus, [source], tmp_path / "milton", "--workers", 2, "--append-eod", "--log-interval", 10
        ),
    )
    docs = read_jsonl(source)
    assert f"processed {len(docs)} documents" in result.stdout
    ds = IndexedDataset(str(tmp_path / "milton_text_document"))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(corpus / "tok.model"))
    assert ds.dtype == np.uint16 and len(ds) == len(docs) == ds.num_documents
    for i in (0, 1, 2, len(docs) - 1):
        np.testing.assert_array_equal(ds[i], tok.tokenize(docs[i]["text"]) + [tok.eod])


def test_preprocess_several_keys_and_txt(corpus, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello", "title": "a title"}) + "\n")
    (tmp_path / "in.txt").write_text("first para\n\n\nsecond para\nline two\n\n")
    run_tool(
        "preprocess_data.py",
        *preprocess_args(corpus, [tmp_path / "in.jsonl"], tmp_path / "k", "--json-keys", "text", "title"),
    )
    assert len(IndexedDataset(str(tmp_path / "k_title_document"))) == 1
    run_tool("preprocess_data.py", *preprocess_args(corpus, [tmp_path / "in.txt"], tmp_path / "whole"))
    run_tool(
        "preprocess_data.py",
        *preprocess_args(corpus, [tmp_path / "*.txt"], tmp_path / "paras", "--txt-doc-separator", ""),
    )
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(corpus / "tok.model"))
    whole = IndexedDataset(str(tmp_path / "whole_text_document"))
    assert len(whole) == 1 and tok.detokenize(whole[0]) == "first para\n\n\nsecond para\nline two"
    paras = IndexedDataset(str(tmp_path / "paras_text_document"))
    assert [tok.detokenize(p) for p in paras[:]] == ["first para", "second para\nline two"]


BAD_CASES = {
    "malformed": (b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', "bad.jsonl:3", "malformed JSON"),
    "missing_key": (b'{"text": "ok"}\n\n{"body": "x"}\n', "bad.jsonl:3", "missing key 'text'"),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_lines_fail_cleanly(corpus, tmp_path, case):
    data, location, reason = BAD_CASES[case]
    (tmp_path / "bad.jsonl").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    result = run_tool(
        "preprocess_data.py",
        *preprocess_args(corpus, [tmp_path / "bad.jsonl"], out / "bad", "--workers", 2),
        check=False,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert location in last_line and reason in last_line
    assert os.listdir(out) == []  # no partial or temp files

    result = run_tool(
        "preprocess_data.py",
        *preprocess_args(corpus, [tmp_path / "bad.jsonl"], out / "bad", "--skip-bad-lines"),
    )
    assert "skipped 1 bad lines" in result.stdout
    good_docs = data.count(b'"ok"')
    assert len(IndexedDataset(str(out / "bad_text_document"))) == good_docs


def test_preprocess_flag_errors(corpus, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    result = run_tool(
        "preprocess_data.py",
        "--input",
        tmp_path / "in.jsonl",
        "--output-prefix",
        tmp_path / "o",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tmp_path / "nope.model",
        check=False,
    )
    assert result.returncode == 1 and "--tokenizer-model" in result.stderr and "nope.model" in result.stderr
    result = run_tool(
        "preprocess_data.py",
        *preprocess_args(corpus, [tmp_path / "missing.jsonl"], tmp_path / "o"),
        check=False,
    )
    assert result.returncode == 1 and "--input" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_train_tokenizer_reports_bad_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{oops\n')
    result = run_tool(
        "train_tokenizer.py",
        "--input",
        tmp_path / "t.jsonl",
        "--model-prefix",
        tmp_path / "m",
        "--vocab-size",
        300,
        check=False,
    )
    assert result.returncode == 1 and "t.jsonl:2" in result.stderr
    assert not (tmp_path / "m.model").exists()


def train_byte_level_bpe(directory):
    """A tiny GPT-2-style tokenizer: vocab.json + merges.txt + tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    text = ["the quick brown fox jumps over the lazy dog", "to be or not to be, that is the question"] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(directory))
    bpe.save(str(directory / "tokenizer.json"))
    return directory / "vocab.json", directory / "merges.txt"


def test_gpt2_bpe_and_huggingface_tokenizers(tmp_path):
    vocab, merges = train_byte_level_bpe(tmp_path)
    text = "the lazy fox asks: to be? Ünïcødé\n  ok"
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    assert gpt2.detokenize(gpt2.tokenize(text)) == text
    assert gpt2.eod == 0 and gpt2.vocab_size <= 300
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert hf.tokenize(text) == gpt2.tokenize(text) and hf.detokenize(hf.tokenize(text)) == text
    assert hf.eod == 0 and hf.pad is None
    with pytest.raises(FileNotFoundError, match="--merge-file.*nope.txt"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--vocab-file is required"):
        build_tokenizer("GPT2BPETokenizer", merge_file=str(merges))


def test_null_tokenizer_data_trains_and_the_tools_share_its_eod(tmp_path):
    """NullTokenizer --vocab-size 50 --append-eod writes eod = 50; pretraining on it builds a vocabulary of 51
    (no id lands in a masked padding column: finite losses), and generate / evaluate rebuild that tokenizer."""
    import math

    from megatron_eff.arguments import config_from_args, parse_args
    from megatron_eff.data.tokenizer import checkpoint_tokenizer
    from megatron_eff.training.checkpointing import read_meta
    from megatron_eff.training.trainer import pretrain

    rng = np.random.default_rng(0)
    docs = [" ".join(map(str, rng.integers(0, 50, rng.integers(5, 40)))) for _ in range(60)]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    run_tool("preprocess_data.py", "--input", tmp_path / "ids.jsonl", "--output-prefix", tmp_path / "ids",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", 50, "--append-eod")
    prefix, ckpt = str(tmp_path / "ids_text_document"), tmp_path / "ckpt"
    assert max(int(doc.max()) for doc in IndexedDataset(prefix)[:]) == 50  # the eod id
    config = config_from_args(parse_args([
        "--model-preset", "llama-tiny", "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", "50", "--seq-length", "16", "--max-position-embeddings", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--eval-interval", "4",
        "--eval-iters", "2", "--log-interval", "100", "--save", str(ckpt)]))
    assert config.model.vocab_size == 51
    result = pretrain(config)
    assert len(result.losses) == 4 and result.state.skipped_iterations == 0
    assert all(math.isfinite(loss) for loss in [*result.losses, *result.valid_losses.values()])

    _, meta = read_meta(str(ckpt))
    tokenizer = checkpoint_tokenizer({}, meta["config"]["data"], meta["config"]["model"]["vocab_size"])
    assert tokenizer.eod == 50 and tokenizer.vocab_size == 51  # what generate and evaluate build
    run_tool("evaluate.py", "--load", ckpt, "--data-path", prefix, "--eval-split", "all",
             "--results-json", tmp_path / "eval.json")
    assert math.isfinite(json.loads((tmp_path / "eval.json").read_text())["loss"])
    generated = run_tool("generate.py", "--load", ckpt, "--prompt", "3 50 7", "--max-new-tokens", 5)
    ids = [int(i) for i in generated.stdout.split()]
    assert ids[:3] == [3, 50, 7] and all(0 <= i <= 50 for i in ids)


def test_null_tokenizer_and_errors(tmp_path):
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.tokenize("5 7 99") == [5, 7, 99] and tok.detokenize([5, 7]) == "5 7"
    assert tok.eod == 100 and tok.vocab_size == 101
    with pytest.raises(ValueError, match="space-separated integers"):
        tok.tokenize("5 x")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-type 'Bert'"):
        build_tokenizer("Bert")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model .*missing.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    (tmp_path / "ids.txt").write_text("1 2 3\n<|endoftext|>\n4 5\n")
    run_tool(
        "preprocess_data.py",
        "--input",
        tmp_path / "ids.txt",
        "--output-prefix",
        tmp_path / "n",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        100,
        "--append-eod",
        "--txt-doc-separator",
        "<|endoftext|>",
    )
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert [d.tolist() for d in ds[:]] == [[1, 2, 3, 100], [4, 5, 100]]
