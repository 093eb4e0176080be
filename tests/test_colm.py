"""CoLM (mini-batch coresets): the selection math against hand computations and brute force, the zeroth-order
scalars against finite differences and autograd, and a tiny run (coreset = the selection recomputed from the
model, kept sources always in, exact resume). Multi-process layouts: tests/test_colm_parallel.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_eff.arguments import config_from_args, parse_args
from megatron_eff.data.builders import collate_samples
from megatron_eff.methods.colm.method import resolve_keep_sources
from megatron_eff.methods.colm.selection import (
    SKETCH_QUANTUM,
    AdamSketch,
    facility_location,
    facility_value,
    greedy_facility_location,
    scalar_similarity,
    select_coreset,
    similarity_matrix,
    source_budgets,
)
from megatron_eff.methods.colm.zo import shared_direction, value_rows, zo_forward_step
from megatron_eff.model.gpt_model import GPTModel
from megatron_eff.training.checkpointing import TRACKER
from megatron_eff.training.trainer import Trainer
from tests.test_trainer_data import make_domain

SEQ = 16


# --- selection math -----------------------------------------------------------------------------------------

def test_adam_normalisation_and_moment_reset_by_hand():
    sketch = AdamSketch(0.9, 0.999, 1e-8)
    g = torch.tensor([[2.0, -1.0], [0.5, 4.0], [-3.0, 1.0]], dtype=torch.float64)
    u, m, v = sketch.normalise(g, step=1)
    # step 1 from zero moments: m = 0.1 g, v = 0.001 g^2, bias-corrected back to g and g^2: u = g / (|g| + eps)
    assert torch.allclose(m, 0.1 * g) and torch.allclose(v, 0.001 * g * g)
    assert torch.allclose(u, g / (g.abs() + 1e-8), rtol=0, atol=1e-15)
    sketch.reset(m, v, [0, 2])  # the moments become the mean over the selected rows
    assert torch.allclose(sketch.m, torch.tensor([-0.05, 0.0], dtype=torch.float64))
    assert torch.allclose(sketch.v, torch.tensor([0.001 * 6.5, 0.001 * 1.0], dtype=torch.float64))
    g2 = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    u2, m2, v2 = sketch.normalise(g2, step=2)
    m_hand = [0.9 * -0.05 + 0.1 * 1.0, 0.9 * 0.0 + 0.1 * 1.0]
    v_hand = [0.999 * 0.0065 + 0.001 * 1.0, 0.999 * 0.001 + 0.001 * 1.0]
    u_hand = [(mi / (1 - 0.9**2)) / (math.sqrt(vi / (1 - 0.999**2)) + 1e-8) for mi, vi in zip(m_hand, v_hand)]
    assert m2[0].tolist() == pytest.approx(m_hand, rel=1e-12)
    assert v2[0].tolist() == pytest.approx(v_hand, rel=1e-12)
    assert u2[0].tolist() == pytest.approx(u_hand, rel=1e-12)
    sketch.reset(m2, v2, [])  # nothing selected: unchanged
    assert torch.allclose(sketch.m, torch.tensor([-0.05, 0.0], dtype=torch.float64))


def test_source_budgets_floor_then_round_robin_to_the_smallest():
    assert source_budgets([10, 10], 6) == [3, 3]
    # floors 6*7/10 = 4, 6*2/10 = 1, 6*1/10 = 0 (sum 5): the +1 goes to the smallest allocation (source 2)
    assert source_budgets([7, 2, 1], 6) == [4, 1, 1]
    # floors 4*5/8 = 2 and 0, 0, 0: the 2 left go +1 to sources 1 and 2 (the smallest, lower index first)
    assert source_budgets([5, 1, 1, 1], 4) == [2, 1, 1, 0]
    # a source never gets more than it has: floors [0, 0] of 1 from [1, 3] -> +1 to source 0; of 3 -> [1, 2]
    assert source_budgets([1, 3], 1) == [1, 0]
    assert source_budgets([1, 1, 6], 7) == [1, 1, 5]
    assert sum(source_budgets([5, 9, 3, 1], 11)) == 11
    with pytest.raises(ValueError, match="budget"):
        source_budgets([1, 1], 3)


@pytest.mark.parametrize("seed", range(6))
def test_lazy_greedy_equals_greedy_and_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 7
    points = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    sim = similarity_matrix(points, "l1" if seed % 2 else "cosine")
    for budget in range(1, 5):
        lazy = facility_location(sim, budget)
        assert lazy == greedy_facility_location(sim, budget)  # the same picks, in the same order
        optimum = max(facility_value(sim, list(s)) for s in itertools.combinations(range(n), budget))
        if budget == 1:  # one pick: greedy is the brute-force optimum
            assert facility_value(sim, lazy) == pytest.approx(optimum, rel=1e-12)
        # submodular maximisation: greedy is within (1 - 1/e) of the optimum
        assert facility_value(sim, lazy) >= (1 - 1 / math.e) * optimum - 1e-12


def test_lazy_greedy_on_ties_picks_the_lowest_index():
    sim = torch.ones(4, 4, dtype=torch.float64)  # every pick gains the same
    assert facility_location(sim, 2) == greedy_facility_location(sim, 2) == [0, 1]


def test_similarities():
    points = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    dist = torch.tensor([[0, 3, 4], [3, 0, 5], [4, 5, 0]], dtype=torch.float64)
    assert torch.equal(similarity_matrix(points, "l1"), 5 - dist)
    unit = torch.nn.functional.normalize(points[1:], dim=1)
    assert torch.allclose(similarity_matrix(points[1:], "cosine"), 1 + unit @ unit.T)
    r = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert torch.equal(scalar_similarity(r, "l1"), 3.0 - (r[:, None] - r[None, :]).abs())


def test_kept_sources_always_in_the_coreset_and_budgets_per_source():
    gen = torch.Generator().manual_seed(0)
    sources = torch.tensor([0, 1, 2, 0, 1, 0, 2, 0, 1, 0, 0, 1, 0, 2, 0, 1])
    for trial in range(5):
        scalars = torch.randn(16, generator=gen, dtype=torch.float64)
        chosen, info = select_coreset(scalars, sources, {2}, 8, AdamSketch(), trial + 1)
        assert len(chosen) == 8 and chosen == sorted(set(chosen))
        assert {i for i in range(16) if sources[i] == 2} <= set(chosen)  # all 3 of source 2
        assert info["kept"] == 3
        # budget 5 over 8 of source 0 and 5 of source 1: floors 3, 1, then +1 to source 1
        assert info["per_source"] == {0: 3, 1: 2, 2: 3}
    # more kept candidates than the coreset: the first ones in pool order, nothing else
    chosen, info = select_coreset(torch.randn(16, generator=gen), sources, {0}, 4, AdamSketch(), 1)
    assert chosen == [0, 3, 5, 7] and info["kept"] == 4


def _greedy_has_tie(sim: torch.Tensor, budget: int, margin: float = 1e-6) -> bool:
    """Whether some round of the greedy has two best gains within `margin` (relative)."""
    best, chosen = torch.zeros(sim.shape[0], dtype=sim.dtype), []
    for _ in range(budget):
        gains = (sim - best[:, None]).clamp_min(0).sum(0)
        gains[chosen] = -1
        top = gains.topk(2).values
        if top[0] - top[1] <= margin * top[0]:
            return True
        chosen.append(int(gains.argmax()))
        best = torch.maximum(best, sim[:, chosen[-1]])
    return False


def test_scalar_fast_path_equals_the_general_path_under_a_fixed_z():
    """With one z for the run the sketches are rank one (u_i = r_i sign(z) up to Adam's eps term, ~1e-8 / |c_i
    z_k|), so the L1 similarity of the full sketches is zo_dim times the scalar one and facility location picks
    the same. The 1-D objective has exact ties (at step 1 every u_i is sign(c_i), as in the paper's code; later,
    e.g. every point between the two middle ones of an even count is a median), which the eps term breaks
    either way: picks are compared where the greedy has no tie, each step from the same (collinear) moments."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(50, generator=gen, dtype=torch.float64)
    sources = torch.tensor([0] * 15 + [1] * 9 + [2] * 4)
    fast, full = AdamSketch(), AdamSketch()
    compared = 0
    for step in range(1, 13):
        scalars = torch.randn(28, generator=gen, dtype=torch.float64)
        if fast.m is not None:
            full.m, full.v = fast.m * z, fast.v * z * z
        r = fast.normalise(scalars[:24, None], step)[0][:, 0]
        u = full.normalise(scalars[:24, None] * z[None, :], step)[0]
        # the eps term moves each coordinate by ~1e-8 / |c_i z_k| (<= ~1e-5 for these draws): atol 1e-3 of
        # similarities up to 2 x 20 = 40
        assert torch.allclose(similarity_matrix(u[:, :20], "l1"), 20 * scalar_similarity(r, "l1"), rtol=1e-6,
                              atol=1e-3)
        a, _ = select_coreset(scalars, sources, {2}, 12, fast, step, z=None)
        b, _ = select_coreset(scalars, sources, {2}, 12, full, step, z=z, zo_dim=20)
        for source, rows, share in ((0, slice(0, 15), 5), (1, slice(15, 24), 3)):  # budget 8: floors 5, 3
            if not _greedy_has_tie(scalar_similarity(r[rows], "l1"), share):
                compared += 1
                assert [i for i in a if sources[i] == source] == [i for i in b if sources[i] == source], step
    assert compared >= 4


def test_coreset_is_stable_under_last_bit_noise():
    """Another layout computes the scalars with other rounding (~1e-13 relative in float64); the coreset must
    not change, although 1-D facility location ties exactly (the sketches are quantised: selection.py)."""
    gen = torch.Generator().manual_seed(7)
    sources = torch.tensor([0] * 10 + [1] * 6)
    for step in range(1, 21):
        scalars = torch.randn(16, generator=gen, dtype=torch.float64)
        noisy = scalars * (1 + 1e-13 * torch.randn(16, generator=gen, dtype=torch.float64))
        state = AdamSketch()
        state.m, state.v = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
        copy = AdamSketch()
        copy.load_state_dict(state.state_dict())
        assert select_coreset(scalars, sources, set(), 8, state, step)[0] == \
            select_coreset(noisy, sources, set(), 8, copy, step)[0], step


def test_fresh_z_sketches_use_the_top_coordinates():
    """General path: facility location runs on the zo_dim coordinates of largest |mean u| of each source; a
    z with most mass in two coordinates and zo_dim 2 gives the same picks as the sketches cut by hand."""
    gen = torch.Generator().manual_seed(5)
    scalars = torch.randn(10, generator=gen, dtype=torch.float64)
    sources = torch.zeros(10, dtype=torch.long)
    z = torch.randn(30, generator=gen, dtype=torch.float64)
    chosen, _ = select_coreset(scalars, sources, set(), 4, AdamSketch(), 1, z=z, zo_dim=2, similarity="cosine")
    u = AdamSketch().normalise(scalars[:, None] * z[None, :], 1)[0]
    u = torch.round(u / SKETCH_QUANTUM) * SKETCH_QUANTUM
    coords = u.mean(0).abs().topk(2).indices
    expected = sorted(facility_location(similarity_matrix(u[:, coords], "cosine"), 4))
    assert chosen == expected


def test_keep_sources_by_index_name_and_small_rule():
    names = ["shakespeare", "milton", "britannica"]
    assert resolve_keep_sources(("2",), names, [0.5, 0.3, 0.2], False) == {2}
    assert resolve_keep_sources(("milton",), names, [0.5, 0.3, 0.2], False) == {1}
    assert resolve_keep_sources((), names, [0.5, 0.3, 0.2], True) == {1, 2}  # below 1/3
    with pytest.raises(ValueError, match="--colm-keep-sources: 'poetry'"):
        resolve_keep_sources(("poetry",), names, [0.5, 0.3, 0.2], False)
    with pytest.raises(ValueError, match="--colm-keep-sources: '3'"):
        resolve_keep_sources(("3",), names, [0.5, 0.3, 0.2], False)


@pytest.mark.parametrize("flags, message", [
    (["--colm-large-batch-size", "4"], "--colm-large-batch-size 4 must be >= --global-batch-size 8"),
    (["--colm-large-batch-size", "17"], "multiple of --micro-batch-size 2"),
    (["--colm-similarity", "dot"], "invalid choice"),
    (["--colm-zo-eps", "0"], "--colm-zo-eps must be > 0"),
])
def test_bad_flags_name_the_flag(flags, message, capsys):
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--vocab-size", "64", "--mock-data", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "2", "--colm"]
    with pytest.raises((ValueError, SystemExit)) as err:
        config_from_args(parse_args([*base, *flags]))
    assert message in (str(err.value) + capsys.readouterr().err)


# --- zeroth-order scalars -----------------------------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--group-query-attention", "--num-query-groups", "2", "--seq-length", "8",
                       "--max-position-embeddings", "8", "--vocab-size", "64", "--mock-data",
                       "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
                       "--disable-bias-linear", "--train-iters", "1", "--micro-batch-size", "3"])
    return GPTModel(config_from_args(args).model, seed=1).double().eval()


def test_zo_scalars_equal_finite_differences_and_the_directional_derivative():
    model = _tiny_model()
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (3, 9), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.tensor([[1.0] * 8, [1.0] * 5 + [0.0] * 3, [0.0] + [1.0] * 7], dtype=torch.float64)}
    last = model.decoder.layers["1"]
    v_rows = value_rows(last)
    z = shared_direction(11, v_rows, 0, 1)
    eps = 1e-3
    before = model.state_dict()["decoder.layers.1.self_attention.linear_qkv.weight"].clone()
    with torch.no_grad():
        out, loss_func = zo_forward_step(model, batch, None, last_layer_index=1, z=z, eps=eps)
        scalars = loss_func(out)[2]["zo_scalar"]
    assert torch.equal(model.decoder.layers["1"].self_attention.linear_qkv.weight, before)  # restored bit for bit

    def sample_losses():
        token_losses = model(tokens=batch["tokens"], labels=batch["labels"])
        return (token_losses * batch["loss_mask"]).sum(1) / batch["loss_mask"].sum(1)

    saved = v_rows.clone()
    with torch.no_grad():  # the finite difference through the whole model, perturbing the weight itself
        v_rows.add_(z, alpha=eps)
        plus = sample_losses()
        v_rows.add_(z, alpha=-2 * eps)
        minus = sample_losses()
        v_rows.copy_(saved)
    # float64: the same numbers summed in the same order but for the trunk's reuse: rounding ~1e-16 / 2e-3
    assert torch.allclose(scalars, (plus - minus) / (2 * eps), rtol=0, atol=1e-10)
    # against autograd: the central difference errs by O((eps |z|)^2) relative (|z| = 16 here: (eps |z|)^2 =
    # 2.6e-4; measured 2.2e-4), so rtol 2e-3 -- while a wrong sign, scale or direction is off by O(1)
    weight = last.self_attention.linear_qkv.weight
    grads = []
    for i in range(3):
        model.zero_grad()
        sample_losses()[i].backward()
        grads.append((weight.grad.view(2, 4, 8, 32)[:, -1] * z).sum())
    exact = torch.stack(grads)
    assert torch.allclose(scalars, exact, rtol=2e-3, atol=1e-6), (scalars, exact)
    assert scalars.abs().min() > 1e-3  # a real signal, not zeros


def test_shared_direction_is_the_same_global_z_under_tp():
    full = shared_direction(5, torch.zeros(4, 2, 3), 0, 1)
    halves = [shared_direction(5, torch.zeros(2, 2, 3), r, 2) for r in range(2)]
    assert torch.equal(torch.cat(halves), full)
    state = torch.random.get_rng_state()
    shared_direction(5, torch.zeros(4, 2, 3), 0, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone


# --- a tiny run ---------------------------------------------------------------------------------------------

def colm_flags(tmp_path, *extra: str) -> list[str]:
    big = make_domain(tmp_path, "big", 0, 60, seed=1, num_docs=80)
    other = make_domain(tmp_path, "other", 60, 120, seed=2, num_docs=80)
    small = make_domain(tmp_path, "small", 120, 180, seed=3, num_docs=40)
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--vocab-size", "200", "--data-path", "0.5", big, "0.35", other,
            "0.15", small, "--split", "100,0,0", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--colm", "--colm-large-batch-size", "12", "--colm-keep-small-sources", "--log-interval", "100",
            "--lr", "3e-3", "--seed", "5", "--eval-iters", "0", *extra]


def _scalars_by_full_forward(model, dataset, indices, z_seed, eps) -> torch.Tensor:
    """The candidates' c_i recomputed with two whole-model forwards per candidate (no trunk reuse)."""
    batch = collate_samples([dataset[int(i)] for i in indices])
    v_rows = value_rows(model.decoder.layers[str(len(model.decoder.layers) - 1)])
    z, saved = shared_direction(z_seed, v_rows, 0, 1), v_rows.clone()
    with torch.no_grad():
        losses = []
        for sign in (1, -1):
            v_rows.add_(z, alpha=sign * eps)
            losses.append(model(tokens=batch["tokens"], labels=batch["labels"]).mean(1))
            v_rows.copy_(saved)
    return (losses[0] - losses[1]) / (2 * eps)


def test_tiny_run_trains_the_selected_coreset(tmp_path):
    config = config_from_args(parse_args(colm_flags(tmp_path, "--train-iters", "1")))
    trainer = Trainer(config)
    colm = trainer.methods.get("colm")
    assert colm.keep == {2}  # "small" has weight 0.15 < 1/3
    model = trainer.model[0].eval()
    scalars = _scalars_by_full_forward(model, trainer.train_ds, range(12), colm.zo_seed, 1e-3).double()
    sources = torch.tensor([trainer.train_ds.locate(i)[0] for i in range(12)])
    expected, _ = select_coreset(scalars, sources, {2}, 4, AdamSketch(), 1)
    model.train()
    result = trainer.train()
    assert colm.selections == [expected]
    assert (sources == 2).sum() >= 1  # the pool holds some of the small source
    assert {i for i in range(12) if sources[i] == 2} <= set(expected)  # the small source kept whole
    assert trainer.batch_source.consumed_samples == 12  # the pool was read
    assert colm.sketch.m is not None and math.isfinite(result.losses[0])


def test_resume_is_exact(tmp_path):
    flags = colm_flags(tmp_path, "--train-iters", "4")
    reference = Trainer(config_from_args(parse_args(flags)))
    ref = reference.train()
    ckpt = tmp_path / "ckpt"
    first = Trainer(config_from_args(parse_args([*flags, "--save", str(ckpt), "--save-interval", "2",
                                                 "--exit-interval", "2"])))
    first.train()
    (ckpt / TRACKER).write_text("2")
    resumed = Trainer(config_from_args(parse_args([*flags, "--load", str(ckpt)])))
    assert resumed.methods.get("colm").sketch.state_dict() == first.methods.get("colm").sketch.state_dict()
    out = resumed.train()
    assert resumed.methods.get("colm").selections == reference.methods.get("colm").selections[2:]
    assert out.losses == ref.losses[2:]  # bitwise: same weights, moments, z and data position
