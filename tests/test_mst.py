"""MST (Mixed Sparsity Training): schedule, ER densities, prune/grow, masks through training, HSA patterns,
FLOP accounting and resume. Multi-process parity is in test_mst_parallel.py."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.config import ModelConfig
from megatron_eff.methods.mst import method as mst_lib
from megatron_eff.methods.mst.attention_patterns import attention_pattern, pattern_density
from megatron_eff.methods.mst.config import MSTConfig
from megatron_eff.training import flops
from megatron_eff.training.trainer import Trainer

# A tiny GPT with one query group per 2 heads and SwiGLU, so fused fc1 and GQA qkv are both covered.
FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "128", "--swiglu", "--seq-length", "32",
    "--max-position-embeddings", "32", "--vocab-size", "200", "--mock-data", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--lr", "3e-3", "--eval-iters", "0", "--log-interval", "100", "--seed", "3",
    "--mst", "--mst-phase-iters", "8,8,8", "--train-iters", "28", "--mst-update-interval", "2",
    "--mst-hsa-window", "8",
]


# --- schedule -------------------------------------------------------------------------------------------


def test_default_phases_are_fractions_with_a_dense_tail_and_interval_is_capped():
    s = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True), train_iters=100)
    assert (s.warm_end, s.ultra_end, s.restore_end) == (20, 60, 80)  # 0.2/0.4/0.2, then 20 dense iterations
    assert s.update_interval == 5  # 100 requested, a quarter of the shortest phase (20) wins
    assert s.target_sparsity(80) == s.target_sparsity(99) == 0.0 and not s.is_update(81)
    big = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True), train_iters=600_000)
    assert big.update_interval == 100


QUARTERS = (0.25, 0.5, 0.25)  # at 400 iterations: warm-up [0, 100), ultra [100, 300], restoration (300, 400)


@pytest.mark.parametrize("shape", ["staircase", "linear", "cubic"])
@pytest.mark.parametrize("restore", ["mirror", "staircase", "linear", "cubic"])
def test_schedule_values_at_phase_boundaries(shape, restore):
    config = MSTConfig(enabled=True, schedule=shape, restore_schedule=restore, phase_fractions=QUARTERS)
    s = mst_lib.MSTSchedule.from_config(config, train_iters=400)
    assert s.target_sparsity(0) == 0.0  # warm-up starts dense
    assert s.target_sparsity(100) == pytest.approx(0.9)  # end of warm-up
    assert s.target_sparsity(200) == s.target_sparsity(300) == pytest.approx(0.9)
    assert s.target_sparsity(400) == 0.0
    assert all(s.is_update(t) for t in (100, 300, 400))
    values = [s.target_sparsity(t) for t in range(401)]
    assert all(a <= b + 1e-12 for a, b in zip(values[:100], values[1:101]))  # ramps up, then down
    assert all(a >= b - 1e-12 for a, b in zip(values[300:400], values[301:401]))


def test_staircase_steps_and_updates_absorb_each_stair():
    config = MSTConfig(enabled=True, update_interval=7, phase_fractions=QUARTERS, restore_schedule="mirror")
    s = mst_lib.MSTSchedule.from_config(config, train_iters=400)
    assert [s.target_sparsity(t) for t in (0, 24, 25, 50, 75, 99)] == pytest.approx(
        [0, 0, 0.225, 0.45, 0.675, 0.675])
    assert s.is_update(25) and s.is_update(50) and not s.is_update(26)
    assert s.target_sparsity(350) == pytest.approx(0.45) and s.target_sparsity(399) == 0.0
    assert not s.is_update(401)


def test_stairs_are_iterations_capped_for_short_runs():
    long = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True, phase_fractions=QUARTERS), train_iters=40_000)
    # warm-up of 10,000 iterations in stairs of --mst-stair-iters 1000: ten stairs of 0.09
    assert [long.target_sparsity(t) for t in (999, 1000, 5500, 9999)] == pytest.approx([0, 0.09, 0.45, 0.81])
    short = mst_lib.MSTSchedule.from_config(
        MSTConfig(enabled=True, phase_fractions=QUARTERS, stair_iters=20), train_iters=400)
    assert [short.target_sparsity(t) for t in (19, 20, 80)] == pytest.approx([0, 0.18, 0.72])  # 5 stairs of 20
    capped = mst_lib.MSTSchedule.from_config(
        MSTConfig(enabled=True, phase_fractions=QUARTERS, stair_iters=60), train_iters=400)
    assert [capped.target_sparsity(t) for t in (24, 25, 75)] == pytest.approx([0, 0.225, 0.675])  # >= 4 stairs
    staircase = MSTConfig(enabled=True, phase_fractions=QUARTERS, stair_iters=20, restore_schedule="staircase")
    restore = mst_lib.MSTSchedule.from_config(staircase, train_iters=400)
    assert [restore.target_sparsity(t) for t in (319, 320, 399)] == pytest.approx([0.9, 0.72, 0.18])


def test_cubic_restoration_is_mostly_dense_early():
    s = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True), train_iters=400)  # restoration (240, 320)
    assert s.target_sparsity(260) == pytest.approx(0.9 * 0.75**3)
    assert s.target_sparsity(267) < 0.9 * (2 / 3) ** 3  # a third in: over 73 % dense
    mirror = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True, restore_schedule="mirror"), train_iters=400)
    assert mirror.target_sparsity(260) == pytest.approx(0.675)  # the staircase reversed: still 75 % of s_max


@pytest.mark.parametrize("shape", ["linear", "cubic"])
def test_continuous_ramps_change_the_topology_only_every_interval(shape):
    s = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True, schedule=shape), train_iters=400)
    assert s.update_interval == 20
    updates = [t for t in range(1, 401) if s.is_update(t)]
    assert updates == list(range(20, 321, 20))  # not every ramp iteration (the target changes at each)
    assert all(s.update_drop_fraction(t) > 0 for t in updates[:-1])


def test_stair_starts_resize_without_churn():
    s = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True, update_interval=7, phase_fractions=QUARTERS),
                                        train_iters=400)
    assert s.is_update(25) and s.update_drop_fraction(25) == 0.0  # a stair starts: resize only
    assert s.is_update(28) and s.update_drop_fraction(28) == pytest.approx(s.drop_fraction_at(28))


def test_drop_fraction_decays_with_cosine():
    s = mst_lib.MSTSchedule.from_config(MSTConfig(enabled=True, phase_fractions=QUARTERS), train_iters=400)
    assert s.drop_fraction_at(0) == pytest.approx(0.3)
    assert s.drop_fraction_at(200) == pytest.approx(0.15)
    assert s.drop_fraction_at(400) == pytest.approx(0.0)


# --- densities and prune/grow ---------------------------------------------------------------------------


def test_er_densities_hit_the_target_and_cap_at_dense():
    shapes = mst_lib.sparse_layer_shapes(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4), 1, False)
    numel = {n: a * b for n, (a, b) in shapes.items()}
    for sparsity in (0.5, 0.9):
        d = mst_lib.layer_densities(shapes, sparsity, "er")
        kept = sum(d[n] * numel[n] for n in shapes)
        assert kept == pytest.approx((1 - sparsity) * sum(numel.values()))
        assert all(0 < v <= 1 for v in d.values())
        # ER: density proportional to (n_in + n_out) / (n_in n_out) among the sparse layers
        qkv, fc2 = "decoder.layers.0.self_attention.linear_qkv", "decoder.layers.0.mlp.linear_fc2"
        ratio = (sum(shapes[qkv]) / numel[qkv]) / (sum(shapes[fc2]) / numel[fc2])
        assert d[qkv] / d[fc2] == pytest.approx(ratio)
    tiny = {"small": (2, 2), "big": (100, 100)}
    d = mst_lib.layer_densities(tiny, 0.5, "er")
    assert d["small"] == 1.0 and d["big"] * 10000 + 4 == pytest.approx(0.5 * 10004)
    assert all(v == pytest.approx(0.3) for v in mst_lib.layer_densities(shapes, 0.7, "uniform").values())


def _layer(n=1000, density=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:int(n * density)]] = True
    return weight * mask, mask, torch.randn(n, generator=g).abs()


def test_prune_grow_keeps_density_constant_and_follows_scores():
    weight, mask, grad = _layer()
    new, grown = mst_lib.prune_and_grow(weight, mask, grad, 200, 0.3, 3.0, torch.Generator().manual_seed(1))
    assert int(new.sum()) == 200  # ultra-sparse phase: as many grown as dropped
    score = mst_lib._rank_key(weight).masked_fill(~mask, math.inf)  # ranked at bf16 precision
    drop_set = torch.zeros_like(mask)
    drop_set[score.argsort(stable=True)[:60]] = True  # floor(200 * 0.3) smallest active magnitudes
    assert new[mask & ~drop_set].all()  # every larger active weight survives
    assert not (mask & ~new & ~drop_set).any()  # only those went
    candidates = ~(mask & ~drop_set)
    grad_key = mst_lib._rank_key(grad).masked_fill(~candidates, -1)
    by_grad = grad_key.sort(descending=True, stable=True).indices[:45]  # r/(r+1) of the 60 grown by gradient
    assert new[by_grad].all()
    assert not (grown & mask).any() and torch.equal(grown, new & ~mask)
    again, _ = mst_lib.prune_and_grow(weight, mask, grad, 200, 0.3, 3.0, torch.Generator().manual_seed(1))
    assert torch.equal(new, again)  # deterministic for a seed


def test_prune_grow_absorbs_target_changes():
    weight, mask, grad = _layer()
    shrink, grown = mst_lib.prune_and_grow(weight, mask, grad, 120, 0.1, 3.0, torch.Generator().manual_seed(0))
    assert int(shrink.sum()) == 120 and not (shrink & ~mask).any() and not grown.any()  # warm-up: drop 80
    dense, grown = mst_lib.prune_and_grow(weight, mask, grad, 1000, 0.3, 3.0, torch.Generator().manual_seed(0))
    assert dense.all() and int(grown.sum()) == 800  # restoration to dense: everything back


def test_hsa_patterns_match_hand_built_masks():
    s, w = 8, 3
    causal = [[k <= q for k in range(s)] for q in range(s)]
    local = [[causal[q][k] and q - k < w for k in range(s)] for q in range(s)]
    strided = [[causal[q][k] and (q - k) % w == 0 for k in range(s)] for q in range(s)]
    assert attention_pattern("local", s, w).tolist() == local
    assert attention_pattern("strided", s, w).tolist() == strided
    union = [[a or b for a, b in zip(x, y)] for x, y in zip(local, strided)]
    assert attention_pattern("sparse", s, w).tolist() == union
    fixed = attention_pattern("fixed", 8, 4).int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1, 1],
    ])
    assert torch.equal(fixed, expected)
    assert pattern_density(attention_pattern("local", s, s)) == 1.0
    assert pattern_density(torch.tensor(local)) == pytest.approx(sum(map(sum, local)) / 36)


# --- FLOP accounting ------------------------------------------------------------------------------------


def test_flop_counter_matches_hand_count_on_toy_model():
    # h=8, 2 heads of 4, 1 query group, ffn 16, vocab padded to 16, 1 layer, seq 4
    config = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=1,
                         ffn_hidden_size=16, seq_length=4, vocab_size=10, make_vocab_size_divisible_by=16)
    tokens, s = 12, 4
    qkv, proj, fc1, fc2, head = 2 * 8 * 16, 2 * 8 * 8, 2 * 8 * 16, 2 * 16 * 8, 2 * 8 * 16  # forward/token
    core = 2 * s * 8 + 2 * s * 8
    assert flops.sparse_training_flops(config, tokens, s) == flops.model_flops_per_iteration(config, tokens, s)
    names = list(flops.linear_shapes(config))
    d = {names[0]: 0.5, names[1]: 0.25, names[2]: 0.1, names[3]: 1.0}
    plain = 3 * (0.5 * qkv + 0.25 * proj + 0.1 * fc1 + fc2 + head) + 3 * 0.5 * core
    got = flops.sparse_training_flops(config, tokens, s, d, {0: 0.5})
    assert got == pytest.approx(tokens * plain)
    # an update iteration computes the sparse layers' weight gradients dense (RigL's 2 f_s + f_D)
    update = plain + (1 - 0.5) * qkv + (1 - 0.25) * proj + (1 - 0.1) * fc1
    assert flops.sparse_training_flops(config, tokens, s, d, {0: 0.5}, dense_weight_grad=True) == pytest.approx(
        tokens * update)


# --- through the training loop --------------------------------------------------------------------------


class Recorder:
    """Checks invariants after every step of the MST method it wraps (everything else is delegated)."""

    def __init__(self, inner):
        self.inner, self.name, self.rows, self.grown_checks = inner, inner.name, [], 0

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def before_iteration(self, it):
        self.inner.before_iteration(it)

    def after_backward(self, it):
        self.inner.after_backward(it)

    def after_step(self, it):
        old = [w.mask.clone() for w in self.inner.weights]
        self.inner.after_step(it)
        for w, before in zip(self.inner.weights, old):
            assert (w.param[~w.mask] == 0).all(), f"iteration {it}: masked weights of {w.name} are not zero"
            grown = w.mask & ~before
            if grown.any():
                state = self.inner.optimizer.state[w.param]
                assert (w.param[grown] == 0).all()
                assert (state["exp_avg"][grown] == 0).all() and (state["exp_avg_sq"][grown] == 0).all()
                self.grown_checks += 1
        hsa = [m.sparse_attention is not None for m in self.inner.attention_modules]
        self.rows.append((it, self.inner.sparsity(), all(hsa) and any(hsa)))


def run(flags, capture=None):
    trainer = Trainer(config_from_args(parse_args(flags)))
    if capture is not None:
        trainer.methods.methods = [Recorder(m) for m in trainer.methods]
        capture["hooks"] = trainer.methods.get("mst")
    return trainer.train()


def test_masks_follow_the_schedule_through_training():
    captured = {}
    run(FLAGS, captured)
    rec = captured["hooks"]
    sparsity = {it: s for it, s, _ in rec.rows}
    assert sparsity[8] == pytest.approx(0.9, abs=0.01)  # end of warm-up
    assert all(sparsity[t] == pytest.approx(sparsity[8], abs=1e-9) for t in range(8, 17))  # ultra: constant
    assert sparsity[24] == 0.0 and sparsity[28] == 0.0  # restoration reaches dense
    assert all(w.mask.all() for w in rec.inner.weights)
    assert rec.grown_checks > 0
    hsa = {it: on for it, _, on in rec.rows}
    assert [it for it in hsa if hsa[it]] == list(range(9, 17))  # HSA during the ultra-sparse phase
    assert rec.inner.saved_x() > 1.2


def test_resume_mid_phase_matches_straight_run(tmp_path):
    """Stop in the ultra-sparse phase (iteration 11, HSA on), resume: same losses, masks and FLOP tally."""
    straight = run([*FLAGS, "--exit-interval", "20"], capture := {})
    masks = {w.name: w.mask.clone() for w in capture["hooks"].inner.weights}
    run([*FLAGS, "--save", str(tmp_path), "--exit-interval", "11"])
    resumed = run([*FLAGS, "--load", str(tmp_path), "--exit-interval", "20"], capture2 := {})
    assert resumed.losses == pytest.approx(straight.losses[11:], rel=1e-6)
    for w in capture2["hooks"].inner.weights:
        assert torch.equal(w.mask, masks[w.name]), w.name
    assert capture2["hooks"].inner.saved_x() == pytest.approx(capture["hooks"].inner.saved_x())


def test_mst_flags_are_validated_with_the_flag_name():
    with pytest.raises(ValueError, match="--mst-max-sparsity"):
        config_from_args(parse_args([*FLAGS, "--mst-max-sparsity", "1.5"]))
    with pytest.raises(ValueError, match="--mst-phase-iters"):
        config_from_args(parse_args([*FLAGS, "--mst-phase-iters", "20,20,20"]))
    with pytest.raises(ValueError, match="--mst-hsa-window"):
        config_from_args(parse_args([*FLAGS, "--mst-hsa-pattern", "fixed", "--mst-hsa-window", "5"]))
    with pytest.raises(ValueError, match="--mst-stair-iters must be >= 1, got 0"):
        config_from_args(parse_args([*FLAGS, "--mst-stair-iters", "0"]))
    with pytest.raises(ValueError, match="--mst-restore-schedule"):
        MSTConfig(enabled=True, restore_schedule="cosine")
    assert math.isclose(config_from_args(parse_args(FLAGS)).method("mst").max_sparsity, 0.9)


class PlantGradient:
    """At one churn update of the ultra-sparse phase, plants a large gradient at the last inactive position
    of the first sparse layer before MST reads the gradients, and records what MST keeps as grow score."""

    def __init__(self, inner, iteration):
        self.inner, self.name, self.iteration = inner, inner.name, iteration
        self.raw = self.score = self.grad_after = self.position = None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def after_backward(self, it):
        if it != self.iteration:
            return self.inner.after_backward(it)
        w = self.inner.weights[0]
        self.position = int((~w.mask).flatten().nonzero().max())  # the highest index: not a tie-break winner
        w.param.grad.view(-1)[self.position] = 1e3  # ~1e5 x the largest real gradient; clipping will scale it
        self.raw = w.param.grad.detach().clone()
        self.inner.after_backward(it)
        self.score = self.inner._grow_scores[w.name].clone()
        self.grad_after = w.param.grad.detach().clone()

    def after_step(self, it):
        self.inner.after_step(it)


def test_grow_score_is_the_unmasked_unclipped_gradient():
    """Growing must rank the dense gradient: the masked one is 0 wherever a weight could grow (gradient growth
    would silently pick the lowest indices), and a clipped one is rescaled. Iteration 12: ultra-sparse, a
    churn update (interval 2), --clip-grad 1.0 active since the planted value makes the norm >= 1e3."""
    trainer = Trainer(config_from_args(parse_args([*FLAGS, "--clip-grad", "1.0", "--exit-interval", "12"])))
    inner = trainer.methods.get("mst")
    assert inner.schedule.is_churn(12) and inner.schedule.phase(11) == "ultra"
    plant = PlantGradient(inner, 12)
    trainer.methods.methods = [plant]
    trainer.train()
    w = inner.weights[0]
    assert torch.equal(plant.score, plant.raw.abs().float())  # unmasked and pre-clip, bit for bit
    assert plant.grad_after.view(-1)[plant.position] == 0  # ... while the optimizer only sees active weights
    assert w.mask.view(-1)[plant.position]  # the planted position was grown
    assert w.param.view(-1)[plant.position] == 0  # grown weights start at 0


@pytest.mark.parametrize("decay", [True, False])
def test_embeddings_weight_decay_flag(decay):
    flags = [*FLAGS, "--train-iters", "2", "--mst-phase-iters", "1,0,1", "--weight-decay", "0.1",
             "--max-position-embeddings", "40"]
    trainer = Trainer(config_from_args(parse_args(flags if decay else [*flags, "--no-mst-decay-embeddings"])))
    (chunk,) = trainer.model
    group_decay = {p: g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert group_decay[chunk.embedding.word_embeddings.weight] == (0.1 if decay else 0.0)  # the tied head too
    assert group_decay[chunk.embedding.position_embeddings.weight] == (0.1 if decay else 0.0)
    assert group_decay[chunk.decoder.layers["0"].mlp.linear_fc1.weight] == 0.1  # linears are always decayed
    before = chunk.embedding.position_embeddings.weight.detach().clone()
    trainer.train()
    # positions 32..39 (past --seq-length) get no gradient and zero AdamW moments: only weight decay moves them
    unused = chunk.embedding.position_embeddings.weight.detach()[32:]
    assert torch.equal(unused, before[32:]) != decay


def test_bench_takes_a_single_negative_flag_as_mst_args(monkeypatch):
    """`bench/mst_quality.py --mst-args "--no-mst-..."`: argparse alone reads the value as an option and fails."""
    import importlib.util

    from tests.dist_utils import ROOT

    spec = importlib.util.spec_from_file_location("mst_quality", ROOT / "bench" / "mst_quality.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mst_quality", bench)  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    args = bench.parse(["--mst-args", "--no-mst-decay-embeddings", "--mst-args", "", "--iters", "3"])
    assert args.mst_args == ["--no-mst-decay-embeddings", ""] and args.iters == 3
    with pytest.raises(SystemExit):  # a flag the bench does not know is still refused
        bench.parse(["--no-such-flag"])
