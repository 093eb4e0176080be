"""Export our tokenizers to a Hugging Face folder that `AutoTokenizer.from_pretrained` loads and that encodes
exactly like `megatron_eff.data.tokenizer` does. No BOS is added (`add_bos_token: false`): our preprocessing does
not add one, so `AutoTokenizer(...).encode(text) == tokenize(text)`.

- Sentencepiece, any `.model` (from `tools/train_tokenizer.py`, from spm_train's defaults, or imported with an
  HF checkpoint): `tokenizer.model` is copied and, for BPE and unigram models, a `tokenizer.json` (the
  `tokenizers` library, `PreTrainedTokenizerFast`) is rebuilt to do what sentencepiece does:
  - normalisation: the model's precompiled charsmap (`nmt_nfkc`, `nfkc`, `nmt_nfkc_cf`, `nfkc_cf`, custom
    rules; `identity` has none) through `normalizers.Precompiled`, with user-defined symbols left as they are;
    `remove_extra_whitespaces` as regex replacements (space runs -> one, leading and trailing ones dropped);
    spaces -> `▁`; the dummy `▁` in front (at the end with `treat_whitespace_as_suffix`) wherever
    sentencepiece puts it: also before leading whitespace (which HF's stock LLaMA conversion skips), and also
    on a text the charsmap deletes whole (a lone control character);
  - words split where no piece can cross, user-defined symbols alone; BPE merges in piece-score order;
    unigram scores; byte fallback; control and unknown pieces are special tokens; decode as sentencepiece's.
  Known gaps, from `tokenizers`' Precompiled, which maps each grapheme cluster as a whole where sentencepiece
  applies the longest rule at each character: a cluster of several characters can normalise differently when
  a rule composes it and it is 6 bytes or more (halfwidth `ｶﾞ`, decomposed Hangul, `e` + U+0301 + ZWJ), or when
  its first character alone has a rule (`Ａ` + U+0323, NBSP + ZWJ); CR LF, the one such cluster in ordinary
  text, is split before. Also: a literal special-token text (`</s>`, and in unigram models a byte piece such
  as `<0x41>`) is read as that token, as in every HF tokenizer, where sentencepiece spells it out; with
  `treat_whitespace_as_suffix` and `remove_extra_whitespaces`, a text of only characters the charsmap deletes
  and spaces gets no dummy `▁`.
  What `tokenizer.json` cannot express (char and word models, `escape_whitespaces` off, a BPE model with
  user-defined symbols whose merges do not rebuild every piece) is exported for transformers'
  `SentencePieceBackend`, which runs sentencepiece itself: exact encoding, but its decode joins the pieces
  and leaves byte-fallback pieces as `<0x..>` text (transformers 5 no longer has a slow LLaMA tokenizer).
- GPT-2 BPE: `vocab.json` + `merges.txt` copied, `tokenizer_config.json` for `GPT2Tokenizer`.
- Hugging Face `tokenizer.json`: copied with its `tokenizer_config.json` when there is one.
- NullTokenizer: nothing to export (ids are the text).

`import_tokenizer` copies an HF folder's tokenizer files next to an imported checkpoint and says which
`--tokenizer-type` reads them (`tokenizer.json` -> HuggingFaceTokenizer, else `tokenizer.model` ->
SentencePieceTokenizer, else `vocab.json` + `merges.txt` -> GPT2BPETokenizer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

SPACE = "\u2581"  # sentencepiece's escaped whitespace
# sentencepiece piece types and model types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE_MODEL = 1, 2
MODEL_TYPES = {UNIGRAM: "unigram", BPE_MODEL: "BPE", 3: "word", 4: "char"}
PRIVATE_USE = 0xF0000  # plane 15: stands in for user-defined symbols while the charsmap runs
# plane 16 private use: the dummy prefix, and a break inside CR LF, while the charsmap runs
DUMMY_MARK, LINE_BREAK_MARK = "\U0010FFFD", "\U0010FFFC"


class NoExactTokenizerJson(ValueError):
    """A sentencepiece model that `tokenizer.json` cannot reproduce (the export then uses the slow class)."""


def _load_sentencepiece_proto(model_file: str):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # needs protobuf
        raise ValueError(f"exporting {model_file} needs the protobuf package ({error})") from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _bpe_merges(vocab: dict[str, int], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, ranked by that piece's id (= BPE score order)."""
    merges = []
    for piece, piece_id in vocab.items():
        if piece not in mergeable:
            continue
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece))
                 if piece[:i] in mergeable and piece[i:] in mergeable]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(piece_id, len(left), len(right), left, right) for left, right in local]
    merges.sort(key=lambda m: m[:3])
    return [(left, right) for _, _, _, left, right in merges]


def _charsmap_steps(charsmap_bytes: bytes, symbols: list[str], dummy: str | None) -> list:
    """The charsmap, applied as sentencepiece does where `tokenizers`' Precompiled (which works per grapheme
    cluster) would not: user-defined symbols it would change are hidden behind private-use characters, as
    sentencepiece leaves them alone; CR LF is split so that each character is mapped; and `dummy` ("front" or
    "end") puts a marker there that becomes the dummy ▁ afterwards, for sentencepiece gives any non-empty text
    its dummy ▁, even one the charsmap deletes whole (a lone control character)."""
    from tokenizers import Regex, normalizers

    charsmap = normalizers.Precompiled(charsmap_bytes)
    changed = [s for s in sorted(symbols, key=len, reverse=True) if charsmap.normalize_str(s) != s]
    hidden = [(s, chr(PRIVATE_USE + i)) for i, s in enumerate(changed)]
    before = [normalizers.Replace(s, mark) for s, mark in hidden]
    after = [normalizers.Replace(mark, s) for s, mark in hidden]
    if charsmap.normalize_str("\r") != "\r":  # the cluster CR LF would come out as CR's mapping alone
        before.append(normalizers.Replace("\r\n", f"\r{LINE_BREAK_MARK}\n"))
        after.append(normalizers.Replace(LINE_BREAK_MARK, ""))
    if dummy:
        before.append(normalizers.Prepend(DUMMY_MARK) if dummy == "front"
                      else normalizers.Replace(Regex(r"\z"), DUMMY_MARK))
        after.append(normalizers.Replace(DUMMY_MARK, SPACE))
    return before + [charsmap] + after


def _normalizer(norm, whitespace_as_suffix: bool, symbols: list[str]):
    """sentencepiece's normalisation as a `tokenizers` sequence: the charsmap; with remove_extra_whitespaces
    runs of spaces become one and a leading one goes; spaces become ▁; with remove_extra_whitespaces trailing
    ▁ go (sentencepiece strips escaped ones, so a literal ▁ too); the dummy ▁ in front (at the end with
    treat_whitespace_as_suffix) of a text that is not empty by then (or, without remove_extra_whitespaces, was
    not empty before the charsmap)."""
    from tokenizers import Regex, normalizers

    where = ("end" if whitespace_as_suffix else "front") if norm.add_dummy_prefix else None
    early = where if norm.precompiled_charsmap and not norm.remove_extra_whitespaces else None
    steps = _charsmap_steps(norm.precompiled_charsmap, symbols, early) if norm.precompiled_charsmap else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A "), "")]
    steps.append(normalizers.Replace(" ", SPACE))
    if norm.remove_extra_whitespaces:
        steps.append(normalizers.Replace(Regex(SPACE + r"+\z"), ""))
    if where and not early:  # Prepend and a zero-width replacement both leave an empty text alone
        steps.append(normalizers.Prepend(SPACE) if where == "front" else normalizers.Replace(Regex(r"\z"), SPACE))
    return normalizers.Sequence(steps)


def _word_splitter(trainer, symbols: list[str]):
    """Split the normalised text where no piece can cross, so that each part is encoded on its own exactly as
    within the whole: user-defined symbols alone (sentencepiece matches them first, unnormalised), and words —
    a ▁ then non-▁ characters (▁ runs lead the word with allow_whitespace_only_pieces; mirrored with
    treat_whitespace_as_suffix); none when split_by_whitespace is off (pieces may hold ▁ anywhere)."""
    from tokenizers import Regex, pre_tokenizers

    symbol = "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True))
    char = f"(?:(?!{symbol})[^{SPACE}])" if symbols else f"[^{SPACE}]"
    if not trainer.split_by_whitespace:
        word = None
    elif trainer.treat_whitespace_as_suffix:
        word = f"{char}+{SPACE}*|{SPACE}+" if trainer.allow_whitespace_only_pieces else f"{char}*{SPACE}|{char}+"
    else:
        word = f"{SPACE}*{char}+|{SPACE}+" if trainer.allow_whitespace_only_pieces else f"{SPACE}{char}*|{char}+"
    pattern = "|".join(p for p in (symbol, word) if p)
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated") if pattern else None


def _model(proto, symbols: list[str], model_file: str):
    """The BPE or unigram model over the same ids. BPE merges: every split of a piece into two pieces, ranked
    by the piece's id, since sentencepiece merges the adjacent pair whose concatenation has the best score."""
    from tokenizers.models import BPE, Unigram

    trainer, pieces = proto.trainer_spec, list(proto.pieces)
    if trainer.model_type == UNIGRAM:  # a user-defined symbol (score 0) beats any split of its own part
        return Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id, trainer.byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece for p in pieces if p.type in (NORMAL, USER_DEFINED)}
    args = dict(vocab=vocab, merges=_bpe_merges(vocab, mergeable), unk_token=pieces[trainer.unk_id].piece,
                fuse_unk=True, byte_fallback=trainer.byte_fallback)
    if not symbols:
        return BPE(**args)
    # merges need not build a user-defined symbol: look whole parts up first (ignore_merges), which leaves every
    # other part alone only if merging each piece's characters gives that piece back
    plain = BPE(**args)
    for piece in mergeable.difference(p.piece for p in pieces if p.type == USER_DEFINED):
        if [t.value for t in plain.tokenize(piece)] != [piece]:
            raise NoExactTokenizerJson(f"{model_file}: user-defined symbols, and BPE merges do not rebuild the "
                                       f"piece {piece!r}")
    return BPE(**args, ignore_merges=True)


def _decoder(norm):
    """sentencepiece's decode: ▁ -> space, byte pieces -> UTF-8; at the start it drops the dummy prefix's ▁ (one,
    with add_dummy_prefix), or every leading ▁ with remove_extra_whitespaces (one per piece while the text is
    still empty: the same for any ids sentencepiece encodes, as those leading pieces hold one ▁ each)."""
    from tokenizers import decoders

    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    leading = 1 << 30 if norm.remove_extra_whitespaces else int(norm.add_dummy_prefix)
    if leading:
        steps.append(decoders.Strip(content=" ", left=leading, right=0))
    return decoders.Sequence(steps)


def sentencepiece_to_tokenizers(model_file: str):
    """A `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor(model_file).encode(text)` (see the
    module docstring for the known gaps); raises NoExactTokenizerJson for a model it cannot express."""
    from tokenizers import AddedToken, Tokenizer

    proto = _load_sentencepiece_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type not in (UNIGRAM, BPE_MODEL):
        kind = MODEL_TYPES.get(trainer.model_type, trainer.model_type)
        raise NoExactTokenizerJson(f"{model_file}: a sentencepiece {kind} model (tokenizer.json holds BPE, unigram)")
    if not norm.escape_whitespaces:
        raise NoExactTokenizerJson(f"{model_file}: escape_whitespaces is off")
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    kept = [s for s in user if " " not in s]  # one with a space is matched before normalisation (added token)
    tokenizer = Tokenizer(_model(proto, kept, model_file))
    tokenizer.normalizer = _normalizer(norm, trainer.treat_whitespace_as_suffix, kept)
    tokenizer.pre_tokenizer = _word_splitter(trainer, kept)
    tokenizer.decoder = _decoder(norm)
    tokenizer.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                  for p in proto.pieces if p.type in (UNKNOWN, CONTROL)])
    tokenizer.add_tokens([AddedToken(s, normalized=False) for s in user if s not in kept])
    return tokenizer


def export_sentencepiece(model_file: str, out_dir: str, model_max_length: int) -> dict:
    """Write tokenizer.json (when it can be exact), tokenizer.model, tokenizer_config.json,
    special_tokens_map.json; returns the special ids (bos/eos/pad) for the model's generation config."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    ids = {name: (i if i >= 0 else None) for name, i in
           (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))}
    tokens = {f"{name}_token": sp.id_to_piece(i) for name, i in ids.items() if i is not None}
    shutil.copyfile(model_file, os.path.join(out_dir, "tokenizer.model"))
    try:
        sentencepiece_to_tokenizers(model_file).save(os.path.join(out_dir, "tokenizer.json"))
        config = _tokenizer_config("PreTrainedTokenizerFast", tokens, model_max_length)
    except NoExactTokenizerJson as reason:
        warnings.warn(f"{reason}: exported for transformers' SentencePieceBackend (runs sentencepiece: exact "
                      "encoding; its decode leaves byte-fallback pieces as <0x..> text)", stacklevel=2)
        config = _tokenizer_config("SentencePieceBackend", tokens, model_max_length, legacy=True)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), tokens)
    return {name: ids[name] for name in ("bos", "eos", "pad")}


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _tokenizer_config(tokenizer_class: str, tokens: dict, model_max_length: int, **extra) -> dict:
    return {"tokenizer_class": tokenizer_class, **tokens, "add_bos_token": False, "add_eos_token": False,
            "model_max_length": model_max_length, "clean_up_tokenization_spaces": False, **extra}


def export_gpt2_bpe(vocab_file: str, merge_file: str, out_dir: str, model_max_length: int) -> dict:
    """vocab.json + merges.txt (and the equivalent tokenizer.json) for `GPT2Tokenizer`."""
    from megatron_eff.data.tokenizer import GPT2BPETokenizer

    tokenizer = GPT2BPETokenizer(vocab_file, merge_file)
    shutil.copyfile(vocab_file, os.path.join(out_dir, "vocab.json"))
    shutil.copyfile(merge_file, os.path.join(out_dir, "merges.txt"))
    tokenizer._tok.save(os.path.join(out_dir, "tokenizer.json"))
    tokens = dict.fromkeys(("bos_token", "eos_token", "unk_token"), "<|endoftext|>")
    config = _tokenizer_config("GPT2Tokenizer", tokens, model_max_length, add_prefix_space=False)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), tokens)
    return {"bos": tokenizer.bos, "eos": tokenizer.eod, "pad": None}


def export_hf_tokenizer(path: str, out_dir: str, model_max_length: int) -> dict:
    """Copy a `tokenizer.json` (+ its tokenizer_config.json / special_tokens_map.json when present)."""
    from megatron_eff.data.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(path)
    source = os.path.dirname(tokenizer.path)
    shutil.copyfile(tokenizer.path, os.path.join(out_dir, "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    if not os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
        names = {"bos": tokenizer.bos, "eos": tokenizer.eod, "pad": tokenizer.pad}
        tokens = {f"{k}_token": tokenizer._tok.id_to_token(i) for k, i in names.items() if i is not None}
        _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                    _tokenizer_config("PreTrainedTokenizerFast", tokens, model_max_length))
    return {"bos": tokenizer.bos, "eos": tokenizer.eod, "pad": tokenizer.pad}


def export_tokenizer(args: dict, out_dir: str, model_max_length: int, model_vocab_size: int) -> dict:
    """Export the tokenizer `args` names (`tokenizer_type`, `tokenizer_model`, `vocab_file`, `merge_file`);
    returns its special ids {"bos", "eos", "pad"} (None where absent)."""
    from megatron_eff.data.tokenizer import build_tokenizer

    kind = args.get("tokenizer_type") or "NullTokenizer"
    if kind == "NullTokenizer":
        return {"bos": None, "eos": None, "pad": None}  # ids are the text: no tokenizer files
    if kind == "TikTokenizer":
        raise ValueError("--tokenizer-type TikTokenizer: exporting it as a Hugging Face tokenizer is not "
                         "implemented; pass --tokenizer-type NullTokenizer to export the weights alone")
    for flag in ("tokenizer_model", "vocab_file", "merge_file"):
        path = args.get(flag)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: not found (the checkpoint's run used it; "
                                    "pass the file's current path)")
    tokenizer = build_tokenizer(kind, tokenizer_model=args.get("tokenizer_model"),
                                vocab_file=args.get("vocab_file"), merge_file=args.get("merge_file"))
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"--tokenizer-type {kind}: {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary ({model_vocab_size})")
    if kind == "SentencePieceTokenizer":
        return export_sentencepiece(args["tokenizer_model"], out_dir, model_max_length)
    if kind == "GPT2BPETokenizer":
        return export_gpt2_bpe(args["vocab_file"], args["merge_file"], out_dir, model_max_length)
    return export_hf_tokenizer(args["tokenizer_model"], out_dir, model_max_length)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def import_tokenizer(hf_dir: str, out_dir: str, final_dir: str) -> dict:
    """Copy the HF folder's tokenizer files to `out_dir` (which will live at `final_dir`); returns the data
    config (`tokenizer_type`, `tokenizer_model`, `vocab_file`, `merge_file`) that reads them, {} if none."""
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if "tokenizer.json" in present:
        data = {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": os.path.join(final_dir, "tokenizer.json")}
    elif "tokenizer.model" in present:
        data = {"tokenizer_type": "SentencePieceTokenizer",
                "tokenizer_model": os.path.join(final_dir, "tokenizer.model")}
    elif {"vocab.json", "merges.txt"} <= set(present):
        data = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": os.path.join(final_dir, "vocab.json"),
                "merge_file": os.path.join(final_dir, "merges.txt")}
    else:
        return {}
    os.makedirs(out_dir)
    for name in present:
        shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))
    return data
