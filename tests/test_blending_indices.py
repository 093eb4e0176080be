"""The compiled blending-index helper against the Python rule: identical output for every kind of input."""

import shutil

import numpy as np
import pytest

from megatron_eff.data import blending_indices as bi
from megatron_eff.data.blended_dataset import build_blending_indices, normalize_weights

HAVE_COMPILER = bool(shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))


def assert_same_as_reference(weights, size, start_counts=None):
    expected = bi.reference_blending_indices(weights, size, start_counts)
    got = build_blending_indices(weights, size, start_counts)
    for name, a, b in zip(("dataset_index", "dataset_sample_index"), expected, got):
        assert b.dtype == np.int64 and b.shape == (size,)
        mismatch = np.flatnonzero(a != b)
        assert mismatch.size == 0, f"{name} differs first at sample {mismatch[:1]} for {weights}, {size}"


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler: the Python rule runs and is the reference")
def test_helper_is_compiled_and_used():
    assert bi.load_helper() is not None


HAND_PICKED = [
    [1.0],  # one dataset
    [0.5, 0.5],  # ties at every even sample
    [1 / 3, 1 / 3, 1 / 3],  # ties, and 1/3 is not exact in binary
    [0.1, 0.2, 0.3, 0.4],  # decimal weights whose products round
    [0.0, 1.0],  # a zero weight first
    [0.6, 0.0, 0.4],  # a zero weight in the middle
    [0.0, 0.0, 0.0, 1.0],
    [1 / 7] * 7,  # seven datasets, all tied
    [0.3, 0.2, 0.15, 0.15, 0.1, 0.05, 0.05],  # seven datasets with ties among them
    [1 - 1e-12, 1e-12],  # one almost never drawn
    [3.0, 1.0],  # not normalised
    [1e-300, 2e-300],  # tiny weights: every product is below the counts
]


@pytest.mark.parametrize("weights", HAND_PICKED, ids=[str(i) for i in range(len(HAND_PICKED))])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 17, 4096])
def test_hand_picked_weights(weights, size):
    assert_same_as_reference(weights, size)


def test_random_weights_and_start_counts():
    rng = np.random.RandomState(0)
    for trial in range(60):
        num = 1 + trial % 7
        raw = rng.rand(num) * (rng.rand(num) > 0.2)  # some zero weights
        raw[rng.randint(num)] += 0.01  # a positive sum
        weights = normalize_weights(raw, num)
        size = int(rng.choice([1, 5, 100, 2000]))
        start_counts = rng.randint(0, 10**6, size=num) if trial % 2 else None
        assert_same_as_reference(weights, size, start_counts)


def test_quantised_weights_make_many_ties():
    """Weights on a coarse grid make exact ties between lags often; ties must go to the lowest index."""
    rng = np.random.RandomState(1)
    for _ in range(30):
        num = rng.randint(2, 8)
        weights = normalize_weights(rng.randint(0, 4, size=num) + (np.arange(num) == 0), num)
        assert_same_as_reference(weights, 3000, rng.randint(0, 5, size=num))


@pytest.mark.slow
def test_large_size():
    assert_same_as_reference(normalize_weights([0.3, 0.2, 0.15, 0.15, 0.1, 0.1], 6), 300_000, [7, 0, 3, 0, 0, 1])


def test_no_compiler_falls_back_to_the_python_rule(monkeypatch):
    def no_compiler():
        raise FileNotFoundError("no C compiler")

    monkeypatch.setattr(bi, "_library_path", no_compiler)
    bi.load_helper.cache_clear()
    try:
        with pytest.warns(UserWarning, match="blending-index helper unavailable .*no C compiler.*Python rule"):
            got = build_blending_indices([0.75, 0.25], 8)
        assert got[0].tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    finally:
        bi.load_helper.cache_clear()


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C compiler")
def test_missing_library_is_built_on_first_use(monkeypatch, tmp_path):
    monkeypatch.setattr(bi, "LIBRARY", tmp_path / "not-built.so")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bi.load_helper.cache_clear()
    try:
        assert bi.load_helper() is not None
        built = list((tmp_path / "cache" / "megatron_eff").iterdir())
        assert [p.name for p in built] == [bi.cached_library_path().name]
        assert_same_as_reference([0.2, 0.8], 1000)
    finally:
        bi.load_helper.cache_clear()


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C compiler")
def test_make_target_builds_the_library(tmp_path, capsys):
    output = tmp_path / "lib.so"
    assert bi.main([str(output)]) == 0
    assert output.is_file() and f"built {output}" in capsys.readouterr().out


def test_a_zero_weight_member_is_never_drawn():
    """Megatron's rule would draw a zero-weight member on the tie at sample 1; live weights can set one to 0."""
    index, sample_index = bi.blending_indices([0.0, 1.0], 6, np.array([4, 4]))
    assert index.tolist() == [1] * 6 and sample_index.tolist() == [4, 5, 6, 7, 8, 9]
    index, _ = bi.blending_indices([0.5, 0.0, 0.5], 50, None)
    assert 1 not in index.tolist()
    both = bi.blending_indices([0.3, 0.7], 50, None)[0]  # all positive: Megatron's output, unchanged
    assert both.tolist() == bi.reference_blending_indices([0.3, 0.7], 50)[0].tolist()
