"""Hugging Face export of any sentencepiece model (`megatron_eff/hf/tokenizer.py`): tiny models trained with
sentencepiece's own defaults (nmt_nfkc, collapsed whitespace, dummy prefix), with byte fallback, with user-defined
symbols or identity normalisation load with `AutoTokenizer` and encode exactly like `SentencePieceProcessor`
(no BOS, as our preprocessing) on tricky strings and every line of a corpus file, and decode like it."""

from __future__ import annotations

import json

import pytest

from megatron_eff.config import ModelConfig
from megatron_eff.hf.convert import export_to_hf, import_from_hf
from megatron_eff.hf.tokenizer import export_sentencepiece
from tests.dist_utils import ROOT
from tests.hf_utils import LLAMA, random_hf_llama, random_model, save_ours

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TRAIN_TEXT = (ROOT / "data" / "corpus" / "milton" / "paradise_regained.txt").read_text(encoding="utf-8")[:30_000]
CHECK_FILE = ROOT / "data" / "corpus" / "britannica" / "shakespeare_entry_1911.txt"  # ’ é ¤ § ° ... beyond ASCII
TRICKY = ["", " ", "   ", "two  spaces   inside", "  leading", "trailing  ", "\ttabs\t\tand\t", "new\nline\n\npara",
          "windows\r\nline\r\n", "ＡＢＣ full width", "ﬁne ﬂow ligatures", "① ㎏ ™ compatibility", "cafe\u0301 e\u0301",
          "emoji 🙂 and 中文 and 한국어", "\u3000ideographic\u00a0no-break", "▁ literal ▁", "digits 12345", "\x1a",
          "\x01", "<sep>start", "a<sep>b [MASK] c", "end [MASK]", "[mask] <SEP>"]
SYMBOLS = ["<sep>", "[MASK]"]
MODELS = {  # sentencepiece trainer options; all else is sentencepiece's default (nmt_nfkc, whitespace removal, ...)
    "defaults-bpe": dict(model_type="bpe", vocab_size=300),
    "defaults-unigram": dict(model_type="unigram", vocab_size=300),
    "nmt-nfkc-byte-fallback-bpe": dict(model_type="bpe", vocab_size=400, byte_fallback=True),
    "nmt-nfkc-byte-fallback-keep-whitespace-unigram": dict(model_type="unigram", vocab_size=400, byte_fallback=True,
                                                           remove_extra_whitespaces=False),
    "nfkc-cf-symbols-bpe": dict(model_type="bpe", vocab_size=400, normalization_rule_name="nmt_nfkc_cf",
                                byte_fallback=True, user_defined_symbols=SYMBOLS, control_symbols=["<ctl>"]),
    "nfkc-no-dummy-unigram": dict(model_type="unigram", vocab_size=300, normalization_rule_name="nfkc",
                                  add_dummy_prefix=False, user_defined_symbols=SYMBOLS),
    "identity-symbols-bpe": dict(model_type="bpe", vocab_size=400, normalization_rule_name="identity",
                                 remove_extra_whitespaces=False, byte_fallback=True, allow_whitespace_only_pieces=True,
                                 split_digits=True, user_defined_symbols=SYMBOLS),
    "identity-collapse-no-dummy-unigram": dict(model_type="unigram", vocab_size=300, add_dummy_prefix=False,
                                               normalization_rule_name="identity"),
}


def train_sentencepiece(directory, name: str, **options) -> str:
    """A tiny sentencepiece model trained on ~30 KB of Milton (well under a second)."""
    lines = [line for line in TRAIN_TEXT.splitlines() if line.strip()]
    prefix = str(directory / name)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, num_threads=1, minloglevel=2,
                                   **options)
    return prefix + ".model"


def exported(model_file: str, out_dir):
    out_dir.mkdir()
    export_sentencepiece(model_file, str(out_dir), model_max_length=64)
    return transformers.AutoTokenizer.from_pretrained(out_dir)


def assert_same_as_sentencepiece(hf, sp, texts):
    expected = sp.encode(texts)
    got = [hf.encode(text) for text in texts]
    wrong = [(text, e, g) for text, e, g in zip(texts, expected, got) if e != g]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first: {wrong[0]}"
    unk = sp.unk_id()
    for text, ids in zip(texts, expected):
        if unk not in ids:  # sentencepiece decodes <unk> as " ⁇ ", HF as its token text
            assert hf.decode(ids) == sp.decode(ids), repr(text)
            if sp.decode(ids) == text:
                assert hf.decode(ids) == text


@pytest.mark.parametrize("options", MODELS.values(), ids=MODELS.keys())
def test_export_encodes_and_decodes_like_sentencepiece(tmp_path, options):
    model_file = train_sentencepiece(tmp_path, "tok", **options)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    hf = exported(model_file, tmp_path / "hf")
    assert type(hf).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast") and len(hf) == sp.vocab_size()
    lines = CHECK_FILE.read_text(encoding="utf-8").split("\n")
    assert_same_as_sentencepiece(hf, sp, TRICKY + lines)
    if "user_defined_symbols" in options:  # kept whole, also where the normalisation would change them
        assert [sp.id_to_piece(i) for i in hf.encode("x[MASK]y")].count("[MASK]") == 1


def test_what_tokenizer_json_cannot_express_falls_back_to_sentencepiece(tmp_path):
    """A char model has no `tokenizers` equivalent: AutoTokenizer then runs sentencepiece itself."""
    model_file = train_sentencepiece(tmp_path, "char", model_type="char", vocab_size=60)
    sp = spm.SentencePieceProcessor(model_file=model_file)
    with pytest.warns(UserWarning, match="a sentencepiece char model .*SentencePieceBackend"):
        hf = exported(model_file, tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "tokenizer.model").exists()
    assert [hf.encode(text) for text in TRICKY] == sp.encode(TRICKY)


def test_hf_import_then_export_keeps_a_sentencepiece_tokenizer(tmp_path):
    """An HF folder shipping only `tokenizer.model` (spm defaults: nmt_nfkc): import, then export the checkpoint."""
    hf = random_hf_llama()
    hf.save_pretrained(tmp_path / "hf")
    model_file = train_sentencepiece(tmp_path, "tok", model_type="bpe", vocab_size=300)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(open(model_file, "rb").read())
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"), seq_length=48)
    meta = json.loads((tmp_path / "ours" / "iter_0000000" / "meta.json").read_text())
    assert meta["config"]["data"]["tokenizer_type"] == "SentencePieceTokenizer"
    export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert_same_as_sentencepiece(tokenizer, spm.SentencePieceProcessor(model_file=model_file), TRICKY)
    # and a checkpoint of ours trained with that tokenizer exports it the same way
    data = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model_file}
    save_ours(random_model(ModelConfig(**LLAMA)), tmp_path / "ckpt", data)
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert [again.encode(t) for t in TRICKY] == [tokenizer.encode(t) for t in TRICKY]
