"""Sheared LLaMA pruning: hard-concrete gates against the formulas, the masked model against the extracted
one, the Lagrangian's ascent, resume, the extraction tool end to end. Multi-process parity is in
test_sheared_parallel.py; dynamic batch loading in test_dbl.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig
from megatron_eff.hf.convert import export_to_hf
from megatron_eff.methods.prune import hard_concrete as hc
from megatron_eff.methods.prune.config import PruneConfig
from megatron_eff.methods.prune.extract import extract
from megatron_eff.methods.prune.method import Prune, expected_num_params, num_params
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.parallel.state import ParallelState
from megatron_eff.training.checkpointing import load_model_tensors
from megatron_eff.training.trainer import Trainer
from tests.dist_utils import ROOT

LLAMA = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
         "--num-query-groups", "2", "--ffn-hidden-size", "96", "--swiglu", "--normalization", "RMSNorm",
         "--position-embedding-type", "rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "200"]
GPT2 = ["--num-layers", "3", "--hidden-size", "48", "--num-attention-heads", "4", "--ffn-hidden-size", "96",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "200"]
TARGETS = {"llama": ["--prune-target-num-layers", "2", "--prune-target-hidden-size", "40",
                     "--prune-target-num-attention-heads", "2", "--prune-target-ffn-hidden-size", "48"],
           "gpt2": ["--prune-target-num-layers", "2", "--prune-target-hidden-size", "32",
                    "--prune-target-num-attention-heads", "3", "--prune-target-ffn-hidden-size", "40"]}
TRAIN = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--eval-iters", "0",
         "--log-interval", "100", "--seed", "5"]


def run_config(model_flags, *extra):
    return config_from_args(parse_args([*model_flags, *TRAIN, *extra]))


# --- hard concrete --------------------------------------------------------------------------------------


def test_sample_and_keep_probability_match_the_formulas():
    log_alpha = torch.tensor([-3.0, 0.0, 1.5, 4.0], dtype=torch.float64)
    u = torch.tensor([0.1, 0.5, 0.7, 0.02], dtype=torch.float64)
    s = [1 / (1 + math.exp(-(math.log(ui) - math.log(1 - ui) + la) / (2 / 3))) for ui, la in zip(u, log_alpha)]
    expected = [min(1.0, max(0.0, si * 1.2 - 0.1)) for si in s]
    assert hc.sample_gate(log_alpha, u).tolist() == pytest.approx(expected, abs=1e-12)
    keep = [1 - 1 / (1 + math.exp(-((2 / 3) * math.log(0.1 / 1.1) - la))) for la in log_alpha.tolist()]
    assert hc.keep_probability(log_alpha).tolist() == pytest.approx(keep, abs=1e-12)
    assert hc.soft_value(log_alpha).tolist() == pytest.approx(
        [1 / (1 + math.exp(-0.8 * la / (2 / 3))) for la in log_alpha.tolist()], abs=1e-12)


def test_keep_probability_is_the_fraction_of_nonzero_draws():
    """P(z > 0) by Monte Carlo: n = 200k draws per unit, so the estimate's standard deviation is at most
    sqrt(0.25 / n) = 1.1e-3; 6e-3 is > 5 sigma."""
    log_alpha = torch.tensor([-2.0, 0.0, 1.0, 3.0]).repeat(200_000, 1)
    u = hc.uniform_noise(log_alpha.shape, torch.Generator().manual_seed(0))
    frequency = (hc.sample_gate(log_alpha, u) > 0).float().mean(0)
    assert frequency.tolist() == pytest.approx(hc.keep_probability(log_alpha[0]).tolist(), abs=6e-3)


def test_deterministic_gate_keeps_exactly_the_largest_per_row():
    log_alpha = torch.tensor([[0.5, 3.0, -1.0, 2.0], [4.0, 4.0, 4.0, 4.0]])
    gate = hc.deterministic_gate(log_alpha, 2)
    assert gate[0].nonzero().flatten().tolist() == [1, 3]
    assert gate[1].nonzero().flatten().tolist() == [0, 1]  # ties: the lower index
    assert gate[0, 1].item() == pytest.approx(hc.soft_value(torch.tensor(3.0)).item())
    assert hc.deterministic_gate(log_alpha, torch.tensor([1, 3])).count_nonzero(-1).tolist() == [1, 3]
    # during pruning: n - round(sum of drop probabilities)
    assert hc.expected_keep_count(torch.tensor([[4.6] * 4, [-4.6] * 4])).tolist() == [4, 0]


# --- masked model == extracted model ----------------------------------------------------------------------


def masked_and_extracted_losses(model_flags, target_flags):
    # large init so the logits are far from uniform: a wrong fold moves the loss by far more than 1e-5
    config = run_config(model_flags, "--train-iters", "10", "--prune", "--prune-eval-target-shape",
                        "--init-method-std", "0.3", *target_flags)
    torch.manual_seed(0)
    model = GPTModel(config.model, ParallelState.single(), seed=1)
    method = Prune(config.method("prune"), config, ParallelState.single())
    method.transform_model([model])
    with torch.no_grad():  # spread the logits (no ties) and the norm weights, so every fold matters
        for name, p in model.named_parameters():
            if name.startswith("prune.") and "lambdas" not in name:
                p.copy_(torch.randn(p.shape) * 2)
            elif "norm" in name:
                p.add_(torch.randn(p.shape) * 0.3)
    method.refresh()
    tokens = torch.randint(0, 200, (3, 16), generator=torch.Generator().manual_seed(2))
    labels = torch.roll(tokens, -1, 1)
    model.eval()
    with torch.no_grad():
        masked = model(tokens, labels).mean().item()
    tensors = {k: v for k, v in model.state_dict().items()}
    pruned_config, pruned = extract(tensors, config.model, method.targets)
    small = GPTModel(pruned_config, ParallelState.single(), seed=None).eval()
    small.load_state_dict(pruned, strict=True)
    with torch.no_grad():
        extracted = small(tokens, labels).mean().item()
    return masked, extracted, pruned_config, small, config


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_masked_model_equals_extracted_model(shape):
    """fp32 forward of the same function computed two ways (folded vs multiplied gates, norms over 40 of
    64 dims vs 40 dims): differences are rounding, ~1e-7 relative on a loss of ~5."""
    model_flags = LLAMA if shape == "llama" else GPT2
    masked, extracted, pruned_config, small, config = masked_and_extracted_losses(model_flags, TARGETS[shape])
    assert abs(masked - extracted) <= 1e-5 * abs(masked)
    prune = config.method("prune")
    heads = prune.target_num_attention_heads
    assert (pruned_config.num_layers, pruned_config.hidden_size, pruned_config.num_attention_heads,
            pruned_config.ffn_hidden_size) == (prune.target_num_layers, prune.target_hidden_size, heads,
                                               prune.target_ffn_hidden_size)
    # parameter count of the extracted model == a dense model built with the target shape
    assert small.num_parameters() == GPTModel(pruned_config, ParallelState.single()).num_parameters()
    assert len(small.decoder.layers) == prune.target_num_layers


def test_gqa_prunes_whole_query_groups_and_checks_the_target():
    config = run_config(LLAMA, "--prune", *TARGETS["llama"], "--train-iters", "4")
    assert config.method("prune").targets(config.model)["head"] == (2, 1)
    with pytest.raises(ValueError, match="--prune-target-num-attention-heads 3 must be a multiple"):
        run_config(LLAMA, "--prune", "--prune-target-num-attention-heads", "3", "--train-iters", "4")
    with pytest.raises(ValueError, match="--prune-target-hidden-size 80 is larger than the model's --hidden-size 64"):
        run_config(LLAMA, "--prune", "--prune-target-hidden-size", "80", "--train-iters", "4")


def test_expected_params_formula():
    model = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=12, num_attention_heads=4, num_query_groups=2,
                        swiglu=True, seq_length=8, max_position_embeddings=8, vocab_size=10)
    # per layer: q, o 4 heads x 2 dims x 8 = 64 each, k, v 2 groups x 2 x 8 = 32 each; mlp 3 x 8 x 12 = 288
    assert num_params(model) == 2 * (64 + 64 + 32 + 32 + 288)
    half = {"hidden": torch.full((8,), 0.5), "layer": torch.tensor([1.0, 0.0])}
    assert expected_num_params(half, model) == pytest.approx(num_params(model) / 4)


# --- training ---------------------------------------------------------------------------------------------


def test_lambda_moves_by_ascent_and_sparsity_follows_the_target():
    config = run_config(LLAMA, "--train-iters", "6", "--prune", *TARGETS["llama"], "--prune-lagrangian-warmup", "0",
                        "--prune-mask-lr", "0.1", "--prune-lambda-lr", "0.1")
    trainer = Trainer(config)
    prune = trainer.methods.get("prune")
    start = prune.expected_sparsity()
    trainer.train()
    lambdas = prune.shared.lambdas.detach()
    # s - t < 0 (dense start, target > 0): ascent drives lambda1 down and lambda2 (gradient (s - t)^2) up
    assert (lambdas[:, 0] < 0).all() and (lambdas[:, 1] > 0).all()
    end = prune.expected_sparsity()
    assert all(end[m] > start[m] for m in start)
    assert prune.target_sparsity("layer", 1) == 0.5  # no warm-up: the final target from the start


def test_target_ramps_over_the_warmup():
    config = run_config(LLAMA, "--train-iters", "10", "--prune", "--prune-target-num-layers", "2")
    prune = Prune(config.method("prune"), config, ParallelState.single())
    assert [prune.target_sparsity("layer", it) for it in (1, 2, 3, 4)] == pytest.approx([0, 0.25, 0.5, 0.5])


def test_pruning_resumes_exactly(tmp_path):
    flags = [*LLAMA, *TRAIN, "--prune", *TARGETS["llama"], "--train-iters", "4", "--save", str(tmp_path / "ck"),
             "--save-interval", "2"]
    full = Trainer(config_from_args(parse_args(flags))).train()
    resumed_flags = [*flags, "--load", str(tmp_path / "ck")]
    part = Trainer(config_from_args(parse_args([*flags[:-2], "--save-interval", "2", "--exit-interval", "2",
                                                "--save", str(tmp_path / "ck2")]))).train()
    assert part.losses == full.losses[:2]
    resumed_flags = [*flags[:-4], "--save", str(tmp_path / "ck3"), "--load", str(tmp_path / "ck2")]
    trainer = Trainer(config_from_args(parse_args(resumed_flags)))
    rest = trainer.train()
    assert rest.losses == full.losses[2:]
    final = load_model_tensors(str(tmp_path / "ck"))[1]
    for name, p in trainer.model[0].named_parameters():
        assert torch.equal(p.detach(), final[name]), name


def test_extraction_tool_and_continued_pretraining(tmp_path):
    """A dense run, pruning from it (--finetune: no masks in that checkpoint), the tool, and continued
    pretraining with the printed flags."""
    dense = [*LLAMA, *TRAIN, "--train-iters", "2", "--save", str(tmp_path / "dense")]
    Trainer(config_from_args(parse_args(dense))).train()
    prune_flags = [*LLAMA, *TRAIN, "--train-iters", "3", "--prune", *TARGETS["llama"], "--load",
                   str(tmp_path / "dense"), "--finetune", "--save", str(tmp_path / "pruning")]
    Trainer(config_from_args(parse_args(prune_flags))).train()
    out = tmp_path / "pruned"
    proc = subprocess.run([sys.executable, "tools/checkpoint/prune.py", "--load-dir", str(tmp_path / "pruning"),
                           "--save-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split("pretrain.py ", 1)[1].split(" ...")[0].split()
    assert printed[printed.index("--num-layers") + 1] == "2" and printed[printed.index("--hidden-size") + 1] == "40"
    result = Trainer(config_from_args(parse_args([*printed, *TRAIN, "--train-iters", "2"]))).train()
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    tools = {"evaluate": ["--text-file", str(tmp_path / "ids.txt"), "--results-json", str(tmp_path / "eval.json")],
             "generate": ["--prompt", "5 17 42", "--max-new-tokens", "4", "--device", "cpu"]}
    (tmp_path / "ids.txt").write_text(" ".join(str(i % 200) for i in range(0, 700, 7)))  # NullTokenizer: ids
    for tool, args in tools.items():  # the tools take it as any checkpoint
        run = subprocess.run([sys.executable, f"tools/{tool}.py", "--load", str(out), *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (tool, run.stderr)
    assert math.isfinite(json.loads((tmp_path / "eval.json").read_text())["loss"])
    assert len(run.stdout.split()) <= 3 + 4 and run.stdout.split()[:3] == ["5", "17", "42"]  # (may stop at eod)
    hf = export_to_hf(str(out), str(tmp_path / "hf"))  # the HF export takes it as any checkpoint
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
            hf["intermediate_size"]) == (2, 40, 2, 1, 48)
    assert hf.get("head_dim", 16) == 16  # the source's head dim, kept
    bad = subprocess.run([sys.executable, "tools/checkpoint/prune.py", "--load-dir", str(tmp_path / "dense"),
                          "--save-dir", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a pruning run's checkpoint" in bad.stderr


def test_prune_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--prune-lagrangian-warmup"):
        PruneConfig(enabled=True, lagrangian_warmup=1.5)
    with pytest.raises(ValueError, match="--prune needs at least one target"):
        run_config(LLAMA, "--prune", "--train-iters", "4")
