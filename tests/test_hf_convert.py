"""Hugging Face conversion both ways (`tools/checkpoint/convert.py`, `megatron_eff/hf`): logits parity with
`transformers` on converted weights, exact round trips, layout-independent export, tokenizer export, errors
that leave no output, and `pretrain.py --load IMPORTED --finetune` under tp2 x pp2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig
from megatron_eff.hf import mapping
from megatron_eff.hf.convert import export_to_hf, import_from_hf, read_hf_folder
from megatron_eff.training.checkpointing import load_model_tensors
from tests.dist_utils import ROOT, TINY_FLAGS, run_layout
from tests.hf_utils import GPT2, LLAMA, ids, random_hf_gpt2, random_hf_llama, random_model, save_ours

transformers = pytest.importorskip("transformers")

ARCHS = {"llama-gqa": LLAMA, "llama-tied-bias": {**LLAMA, "untie_embeddings_and_output_weights": False,
                                                  "add_bias_linear": True}, "gpt2": GPT2}


def load_ours(checkpoint):
    from tools.generate import load_model

    return load_model(str(checkpoint)).eval()


# Megatron-LM shape flags: --kv-channels (head dim 16, not 64 / 8) and --apply-layernorm-1p (zero-centred scales)
MEGATRON_SHAPES = {"llama-kv-channels-1p": {**LLAMA, "kv_channels": 16, "apply_layernorm_1p": True},
                   "gpt2-1p": {**GPT2, "apply_layernorm_1p": True}}


@pytest.mark.parametrize("shape", [*ARCHS.values(), *MEGATRON_SHAPES.values()],
                         ids=[*ARCHS.keys(), *MEGATRON_SHAPES.keys()])
def test_export_logits_match_transformers(tmp_path, shape):
    config = ModelConfig(**shape)
    model = random_model(config)
    save_ours(model, tmp_path / "ckpt")
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "LlamaForCausalLM" if config.swiglu else "GPT2LMHeadModel"
    assert type(hf).__name__ == expected and hf.config.vocab_size == config.vocab_size == 300
    tokens = ids(config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(tokens)[..., : config.vocab_size], hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("build", [random_hf_llama, random_hf_gpt2], ids=["llama-gqa", "gpt2"])
def test_import_logits_match_transformers(tmp_path, build):
    hf = build()
    hf.save_pretrained(tmp_path / "hf")
    config, flags = import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"), tensor_parallel_size=2,
                                   seq_length=48)
    assert "--tensor-model-parallel-size" in flags and config.vocab_size == 300
    model = load_ours(tmp_path / "ours")  # padded for TP2 (512 rows), loaded into a TP1 model (384 rows)
    tokens = ids(300)
    with torch.no_grad():
        ours, theirs = model(tokens)[..., :300], hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4
    meta = json.loads((tmp_path / "ours" / "iter_0000000" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 2, "pp": 1, "dp": 1} and meta["config"]["model"]["vocab_size"] == 300


@pytest.mark.parametrize("shape", ARCHS.values(), ids=ARCHS.keys())
def test_round_trip_ours_hf_ours_is_identical(tmp_path, shape):
    config = ModelConfig(**shape)
    save_ours(random_model(config), tmp_path / "ckpt")
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "back"), seq_length=config.seq_length)
    meta_a, before = load_model_tensors(str(tmp_path / "ckpt"))
    meta_b, after = load_model_tensors(str(tmp_path / "back"))
    assert meta_b["config"]["model"] == meta_a["config"]["model"]
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert tensor.shape == after[name].shape, name
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):  # padded: 384 rows
            assert not after[name][config.vocab_size:].any()  # padding re-added as zeros (never used)
            tensor, after[name] = tensor[: config.vocab_size], after[name][: config.vocab_size]
        assert torch.equal(tensor, after[name]), name
    # and HF -> ours -> HF gives the same safetensors
    export_to_hf(str(tmp_path / "back"), str(tmp_path / "hf2"))
    (config_a, hf_a), (config_b, hf_b) = read_hf_folder(str(tmp_path / "hf")), read_hf_folder(str(tmp_path / "hf2"))
    assert config_a == config_b and hf_a.keys() == hf_b.keys()
    assert all(torch.equal(hf_a[k], hf_b[k]) for k in hf_a)


def test_sharded_safetensors_and_bf16(tmp_path):
    model = random_model(ModelConfig(**LLAMA))
    save_ours(model, tmp_path / "ckpt")
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), max_shard_size="40KB", dtype="bfloat16")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not (tmp_path / "hf" / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    embed = model.embedding.word_embeddings.weight[:300].detach()
    assert torch.equal(hf.model.embed_tokens.weight, embed.bfloat16().float())


def test_sentencepiece_tokenizer_export_encodes_like_ours(tmp_path):
    from megatron_eff.data.tokenizer import build_tokenizer

    corpus = (ROOT / "data" / "corpus" / "milton").glob("*")
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(corpus))[:200_000]
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(tmp_path / "corpus.txt"),
                    "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "700"], check=True, capture_output=True)
    config = ModelConfig(**{**LLAMA, "vocab_size": 700})
    data = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": str(tmp_path / "tok.model")}
    save_ours(random_model(config), tmp_path / "ckpt", data)
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    ours = build_tokenizer(**data)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    samples = text.split("\n\n")[:300] + ["  two leading spaces", "trailing  ", "digits 12345 ok", "\n\ttab", "",
                                          "émoji 🙂 and 中文 (byte fallback)"]
    for sample in samples:
        assert theirs.encode(sample) == ours.tokenize(sample), repr(sample)
        assert theirs.decode(ours.tokenize(sample)) == ours.detokenize(ours.tokenize(sample))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (ours.bos, ours.eod) == (1, 2)
    # the imported checkpoint points at the copied tokenizer, which encodes the same
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "back"), seq_length=48)
    run_data = json.loads((tmp_path / "back" / "iter_0000000" / "meta.json").read_text())["config"]["data"]
    back = build_tokenizer(run_data["tokenizer_type"], tokenizer_model=run_data["tokenizer_model"])
    assert all(back.tokenize(s) == ours.tokenize(s) for s in samples)


def test_gpt2_bpe_tokenizer_export(tmp_path):
    from megatron_eff.data.tokenizer import build_tokenizer
    from tests.test_tokenizer_tools import train_byte_level_bpe

    (tmp_path / "bpe").mkdir()
    vocab, merges = train_byte_level_bpe(tmp_path / "bpe")
    data = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(vocab), "merge_file": str(merges)}
    save_ours(random_model(ModelConfig(**GPT2)), tmp_path / "ckpt", data)
    export_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    ours = build_tokenizer(**data)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["the lazy fox asks: to be? Ünïcødé\n  ok", " leading", "x"]:
        assert theirs.encode(text) == ours.tokenize(text)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == ours.eod


def test_pruned_shapes_uniform_export_nonuniform_error(tmp_path):
    config = ModelConfig(**LLAMA)
    tensors = {n: p.detach().clone() for n, p in random_model(config).named_parameters()}
    for i in range(2):  # prune ffn 96 -> 64 in every layer: HF can hold it
        p = f"decoder.layers.{i}.mlp."
        tensors[p + "linear_fc1.weight"] = tensors[p + "linear_fc1.weight"][:, :64]
        tensors[p + "linear_fc2.weight"] = tensors[p + "linear_fc2.weight"][:, :64]
    hf_config, hf = mapping.to_hf(tensors, config)
    assert hf_config["intermediate_size"] == 64 and hf["model.layers.1.mlp.up_proj.weight"].shape == (64, 64)
    # drop query group 1 (4 heads and its k/v) in layer 1 only: per-layer head counts, which HF cannot hold
    shape = mapping.LayerShape(8, 2, 8, 64)
    q, k, v = mapping.split_qkv(tensors["decoder.layers.1.self_attention.linear_qkv.weight"], shape)
    tensors["decoder.layers.1.self_attention.linear_qkv.weight"] = torch.cat([q[:32], k[:8], v[:8]])
    tensors["decoder.layers.1.self_attention.linear_proj.weight"] = tensors[
        "decoder.layers.1.self_attention.linear_proj.weight"][:, :32]
    with pytest.raises(ValueError, match="layer 1 has 4 heads / 1 query groups .* LlamaForCausalLM needs the same"):
        mapping.to_hf(tensors, config)
    del tensors["decoder.layers.0.pre_mlp_layernorm.weight"]
    with pytest.raises(ValueError, match="missing 1 tensor.*decoder.layers.0.pre_mlp_layernorm.weight"):
        mapping.to_hf(tensors, config)


def test_qkv_split_fuse_and_rotary_pairing():
    shape = mapping.LayerShape(num_heads=6, num_query_groups=3, head_dim=4, ffn_hidden_size=8)
    fused = torch.randn((6 + 2 * 3) * 4, 5)  # rows (nq + 2g) d
    q, k, v = mapping.split_qkv(fused, shape)
    assert q.shape == (24, 5) and k.shape == v.shape == (12, 5)
    assert torch.equal(q[:8], fused[:8]) and torch.equal(k[:4], fused[8:12]) and torch.equal(v[:4], fused[12:16])
    assert torch.equal(q[8:16], fused[16:24])  # group 1 starts after group 0's [q q k v]
    assert torch.equal(mapping.fuse_qkv(q, k, v, shape), fused)
    # interleaved pairs (x0, x1), (x2, x3) -> rotate-half pairs (x0, x2), (x1, x3) per head
    rows = mapping.rotate_half_rows(torch.arange(8.0)[:, None], num_heads=2, head_dim=4)
    assert rows.flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def _errors_leave_nothing(tmp_path, hf_dir, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        import_from_hf(str(hf_dir), str(out))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_conversion_errors_are_clear_and_leave_no_output(tmp_path):
    from safetensors.torch import load_file, save_file

    random_hf_llama().save_pretrained(tmp_path / "hf")
    hf_dir = tmp_path / "hf"
    config_path, weights = hf_dir / "config.json", hf_dir / "model.safetensors"
    original_config, original = config_path.read_text(), load_file(weights)

    config_path.write_text(json.dumps({**json.loads(original_config), "model_type": "bert"}))
    _errors_leave_nothing(tmp_path, hf_dir, "unknown architecture model_type='bert'")
    config_path.write_text(original_config)

    save_file({k: v for k, v in original.items() if "layers.1.mlp.up_proj" not in k}, weights)
    _errors_leave_nothing(tmp_path, hf_dir, r"missing \['model.layers.1.mlp.up_proj.weight'\]")

    save_file({**original, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 64)}, weights)
    _errors_leave_nothing(tmp_path, hf_dir, r"k_proj.weight' has shape \(32, 64\), config.json implies \(16, 64\)")
    save_file(original, weights)

    with pytest.raises(ValueError, match="--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        import_from_hf(str(hf_dir), str(tmp_path / "out"), tensor_parallel_size=4)
    assert not (tmp_path / "out").exists()

    # ours -> HF: a shape no HF class has; an existing output folder
    mix = ModelConfig(**{**LLAMA, "normalization": "LayerNorm"})
    save_ours(random_model(mix), tmp_path / "mix")
    with pytest.raises(ValueError, match="no Hugging Face architecture matches .*normalization=LayerNorm"):
        export_to_hf(str(tmp_path / "mix"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="already exists and is not empty"):
        export_to_hf(str(tmp_path / "mix"), str(hf_dir))


def test_cli_both_directions(tmp_path):
    save_ours(random_model(ModelConfig(**GPT2)), tmp_path / "ckpt")
    tool = [sys.executable, str(ROOT / "tools" / "checkpoint" / "convert.py"), "--model-type", "GPT"]
    to_hf = subprocess.run([*tool, "--loader", "megatron", "--saver", "hf", "--load-dir", str(tmp_path / "ckpt"),
                            "--save-dir", str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
    assert to_hf.returncode == 0, to_hf.stderr
    assert "GPT2LMHeadModel" in to_hf.stdout and (tmp_path / "hf" / "model.safetensors").exists()
    back = subprocess.run([*tool, "--loader", "hf", "--saver", "megatron", "--load-dir", str(tmp_path / "hf"),
                           "--save-dir", str(tmp_path / "back"), "--target-tensor-parallel-size", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert back.returncode == 0, back.stderr
    assert "--tensor-model-parallel-size 2" in back.stdout and "--load" in back.stdout
    # the flags file builds the imported model: same shape as the checkpoint's, for the target layout
    flags = (tmp_path / "back" / "pretrain_flags.txt").read_text().splitlines()
    assert " ".join(flags) in back.stdout
    config = config_from_args(parse_args([*flags, "--mock-data"]))
    assert dataclasses.asdict(config.model) == config_from_meta(tmp_path / "back")
    assert config.parallel.tensor_model_parallel_size == 2
    again = subprocess.run([*tool, "--loader", "hf", "--saver", "megatron", "--load-dir", str(tmp_path / "ckpt"),
                            "--save-dir", str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "no config.json" in again.stderr and len(again.stderr.splitlines()) == 1


# ------------------------------------------------------------------------------------------ multi-process

ONE_STEP = ["--train-iters", "1", "--make-vocab-size-divisible-by", "96"]  # 201 -> 288 rows at TP1, 384 at TP2
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


@pytest.mark.slow
def test_tp2_pp2_checkpoint_exports_like_tp1(tmp_path):
    run = run_layout(tmp_path / "tp2pp2.pt", [*TINY_FLAGS, *ONE_STEP, *TP2_PP2, "--save", str(tmp_path / "a")], 4)
    single = run_layout(tmp_path / "tp1.pt", [*TINY_FLAGS, *ONE_STEP, "--save", str(tmp_path / "b")])
    assert run["losses"] == pytest.approx(single["losses"], rel=1e-5)
    export_to_hf(str(tmp_path / "a"), str(tmp_path / "hf_a"))
    export_to_hf(str(tmp_path / "b"), str(tmp_path / "hf_b"))
    (config_a, hf_a), (config_b, hf_b) = read_hf_folder(str(tmp_path / "hf_a")), read_hf_folder(str(tmp_path / "hf_b"))
    assert config_a == config_b and hf_a.keys() == hf_b.keys() and hf_a["model.embed_tokens.weight"].shape[0] == 201
    # exactly the weights the tp2 x pp2 run held (gathered by the harness), mapped to HF names
    config = ModelConfig(**config_from_meta(tmp_path / "a"))
    _, expected = mapping.to_hf(run["params"], config)
    for name, tensor in hf_a.items():  # exported as float32 from the float64 parity run (tests/dist_utils.py)
        assert torch.equal(tensor, expected[name].float().contiguous()), name
        assert (tensor - hf_b[name]).abs().max() <= 1e-5, name  # the tp1 run: same up to reduction order


def config_from_meta(checkpoint) -> dict:
    meta, _ = load_model_tensors(str(checkpoint))
    return meta["config"]["model"]


@pytest.mark.slow
def test_imported_checkpoint_finetunes_under_tp2_pp2(tmp_path):
    """HF -> ours for tp2 x pp2, then `pretrain.py --load X --finetune` in that layout and single-process:
    the same first loss, equal to the HF model's loss on the same batch."""
    hf = random_hf_llama(num_hidden_layers=4, vocab_size=200, max_position_embeddings=16)
    hf.save_pretrained(tmp_path / "hf")
    _, flags = import_from_hf(str(tmp_path / "hf"), str(tmp_path / "ours"), tensor_parallel_size=2,
                              pipeline_model_parallel_size=2, seq_length=16)
    common = [*flags[: flags.index("--tensor-model-parallel-size")], "--mock-data", "--micro-batch-size", "2",
              "--global-batch-size", "8", "--train-iters", "1", "--lr", "1e-3", "--eval-iters", "0",
              "--seed", "7", "--load", str(tmp_path / "ours"), "--finetune"]
    parallel = run_layout(tmp_path / "tp2pp2.pt", [*common, *TP2_PP2], 4)
    single = run_layout(tmp_path / "single.pt", common)
    assert parallel["losses"] == pytest.approx(single["losses"], rel=1e-5)

    from megatron_eff.data.builders import collate_samples
    from megatron_eff.data.samplers import MockGPTDataset

    batch = collate_samples([MockGPTDataset(8, 16, 200, 7)[i] for i in range(8)])
    with torch.no_grad():
        logits = hf(batch["tokens"]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    assert abs(single["losses"][0] - hf_loss.item()) <= 1e-4

