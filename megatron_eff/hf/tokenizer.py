"""Export our tokenizers to a Hugging Face folder that `AutoTokenizer.from_pretrained` loads and that encodes
exactly like `megatron_eff.data.tokenizer` does.

- Sentencepiece (`tools/train_tokenizer.py`): a `tokenizer.json` (the `tokenizers` library) rebuilt from the
  `.model` so that it splits text the way sentencepiece does — the dummy prefix `▁` is always prepended
  (also before leading whitespace, which HF's stock LLaMA conversion skips), spaces become `▁`, words are
  `▁*` runs followed by non-`▁` characters (sentencepiece's `allow_whitespace_only_pieces`), BPE merges in
  piece-score order, byte fallback. `tokenizer.model` is copied next to it for tools that want the original.
  No BOS is added (`add_bos_token: false`): our preprocessing does not add one, so
  `AutoTokenizer(...).encode(text) == tokenize(text)`.
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
import shutil

SPECIAL_TYPES = {2: "unknown", 3: "control"}  # sentencepiece piece types kept as special added tokens
USER_DEFINED, BYTE = 4, 6


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


def sentencepiece_to_tokenizers(model_file: str):
    """A `tokenizers.Tokenizer` that encodes like `SentencePieceProcessor(model_file).encode(text)`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = _load_sentencepiece_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise ValueError(f"{model_file}: normalization {norm.name!r} cannot be exported exactly (use identity)")
    if norm.remove_extra_whitespaces or trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{model_file}: remove_extra_whitespaces / treat_whitespace_as_suffix are not supported")
    pieces = list(proto.pieces)
    unk = pieces[trainer.unk_id].piece
    if trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        mergeable = {p.piece for p in pieces if p.type in (1, USER_DEFINED)}
        model = BPE(vocab=vocab, merges=_bpe_merges(vocab, mergeable), unk_token=unk, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 1:  # unigram
        model = Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id, trainer.byte_fallback)
    else:
        raise ValueError(f"{model_file}: sentencepiece model type {trainer.model_type} is not BPE or unigram")
    tokenizer = Tokenizer(model)
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    # sentencepiece's words: a run of ▁ then non-▁ characters (or each ▁ alone starts one)
    word = "▁*[^▁]+|▁+" if trainer.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                  for p in pieces if p.type in SPECIAL_TYPES])
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False) for p in pieces if p.type == USER_DEFINED])
    return tokenizer


def export_sentencepiece(model_file: str, out_dir: str, model_max_length: int) -> dict:
    """Write tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json; returns the
    special ids (bos/eos/pad) for the model's generation config."""
    import sentencepiece

    tokenizer = sentencepiece_to_tokenizers(model_file)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(model_file, os.path.join(out_dir, "tokenizer.model"))
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    ids = {name: (i if i >= 0 else None) for name, i in
           (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))}
    tokens = {f"{name}_token": sp.id_to_piece(i) for name, i in ids.items() if i is not None}
    config = _tokenizer_config("PreTrainedTokenizerFast", tokens, model_max_length)
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
