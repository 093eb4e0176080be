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


def _special(piece_id: int | None, tokenizer) -> str | None:
    return None if piece_id is None else tokenizer.id_to_token(piece_id)


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
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), tokens)
    return ids


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
